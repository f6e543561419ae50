from __future__ import annotations

from tests.fixtures.servers import (  # noqa: F401 - registers the server fixtures
    moto_server_fixture,
    postgres_schema_dsn,
    postgres_server_fixture,
    s3_bucket,
)
