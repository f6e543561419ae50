from __future__ import annotations

from collections.abc import Iterator

import pytest

from signd.custody.enclave import EnclaveBackend
from signd.enclave.client import EnclaveClient
from signd.enclave.server import EnclaveServer, start_enclave
from signd.enclave.transport import InProcessTransport
from tests.enclave.fakes import MemoryBlobStore, MemoryKms, MemoryMetadataStore


@pytest.fixture
def kms() -> MemoryKms:
    return MemoryKms()


@pytest.fixture
def blobs() -> MemoryBlobStore:
    return MemoryBlobStore()


@pytest.fixture
def metadata() -> MemoryMetadataStore:
    return MemoryMetadataStore()


@pytest.fixture
def server(kms: MemoryKms, blobs: MemoryBlobStore) -> Iterator[EnclaveServer]:
    server = start_enclave(None, kms, blobs)
    yield server
    server.close()


@pytest.fixture
def client(server: EnclaveServer) -> Iterator[EnclaveClient]:
    client = EnclaveClient(InProcessTransport(server.serve_connection), timeout=5.0)
    yield client
    client.close()


@pytest.fixture
def backend(client: EnclaveClient, metadata: MemoryMetadataStore) -> EnclaveBackend:
    return EnclaveBackend(client, metadata)
