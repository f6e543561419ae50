"""A kms-server (in a thread) and a KMS custody backend over it, with a SQLite metadata store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from signd.custody.kms import KmsKeyBackend
from signd.kms.server import RunningServer, start_kms_server
from signd.storage.sqlite import SqliteMetadataStore


class RecordingClient:
    """A boto3 client wrapper that keeps every raw signature KMS returned."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.signatures: list[bytes] = []

    def sign(self, **kwargs: Any) -> Any:
        answer = self._client.sign(**kwargs)
        self.signatures.append(answer["Signature"])
        return answer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with start_kms_server(tmp_path_factory.mktemp("kms-home")) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> RecordingClient:
    return RecordingClient(server.client())


@pytest.fixture
def backend(client: RecordingClient, tmp_path: Path) -> Iterator[KmsKeyBackend]:
    metadata = SqliteMetadataStore(tmp_path / "metadata.db")
    with KmsKeyBackend(metadata, client=client) as kms_backend:
        yield kms_backend  # type: ignore[misc]
    metadata.close()
