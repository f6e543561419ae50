"""The session's moto server (from tests.fixtures.servers) for the Secrets Manager tests."""

from tests.fixtures.servers import moto_server_fixture  # noqa: F401
