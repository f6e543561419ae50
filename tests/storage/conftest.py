"""Storage test fixtures: every contract test runs against each blob and metadata store."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from signd.storage.base import BlobStore
from signd.storage.blobs import FilesystemBlobStore
from signd.storage.metadata import SqlMetadataStore
from tests.fixtures.servers import (  # noqa: F401 - registers the fixtures
    MotoServer,
    moto_server_fixture,
    postgres_dsn,
    postgres_schema_dsn,
    postgres_server_fixture,
    s3_bucket,
)


@pytest.fixture(params=["filesystem", "s3"])
def blob_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    """A fresh, empty blob store of each kind."""
    store: BlobStore
    if request.param == "filesystem":
        store = FilesystemBlobStore(tmp_path / "blobs")
    else:
        from signd.storage.s3 import S3BlobStore

        server: MotoServer = request.getfixturevalue("moto_server")
        bucket: str = request.getfixturevalue("s3_bucket")
        store = S3BlobStore(
            bucket, "blobs/", endpoint_url=server.endpoint_url, region="us-east-1", timeout=5
        )
    yield store
    store.close()


@dataclass
class MetadataFactory:
    """Opens store objects ("nodes") on one database; each call is a new object."""

    kind: str
    target: Any
    store_class: type[SqlMetadataStore]
    opened: list[SqlMetadataStore] = field(default_factory=list)

    def __call__(
        self, store_class: type[SqlMetadataStore] | None = None, **options: Any
    ) -> SqlMetadataStore:
        store = (store_class or self.store_class)(self.target, **options)  # type: ignore[call-arg]
        self.opened.append(store)
        return store


@pytest.fixture(params=["sqlite", "postgres"])
def metadata_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MetadataFactory]:
    """A factory of store objects on one fresh database (schema for PostgreSQL) of each kind."""
    factory: MetadataFactory
    if request.param == "sqlite":
        from signd.storage.sqlite import SqliteMetadataStore

        factory = MetadataFactory("sqlite", tmp_path / "meta.sqlite", SqliteMetadataStore)
    else:
        from signd.storage.postgres import PostgresMetadataStore

        dsn = request.getfixturevalue("postgres_schema_dsn")
        factory = MetadataFactory("postgres", dsn, PostgresMetadataStore)
    yield factory
    for store in factory.opened:
        store.close()


@pytest.fixture
def metadata_store(metadata_factory: MetadataFactory) -> SqlMetadataStore:
    return metadata_factory()
