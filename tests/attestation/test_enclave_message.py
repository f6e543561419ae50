"""The enclave's ATTESTATION message: a fresh document from its provider, nonce and user_data
bound, over the in-process transport (the real process is in tests/api)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from signd.attestation import AttestationProvider, SimulatedNsm, measure, verify_attestation
from signd.attestation.document import MAX_USER_FIELD_SIZE
from signd.enclave.client import EnclaveClient
from signd.enclave.protocol import (
    MAX_ATTESTATION_NONCE,
    Frame,
    FrameDecoder,
    MessageType,
    error_from_body,
)
from signd.enclave.server import EnclaveServer, start_enclave
from signd.enclave.transport import InProcessTransport
from signd.errors import (
    ConfigurationError,
    DependencyUnavailable,
    InvalidField,
    UnsupportedOperation,
)
from tests.enclave.fakes import MemoryBlobStore, MemoryKms


@pytest.fixture
def provider(ca_directory: Path) -> SimulatedNsm:
    return SimulatedNsm(ca_directory)


@pytest.fixture
def server(provider: AttestationProvider) -> Iterator[EnclaveServer]:
    server = start_enclave(None, MemoryKms(), MemoryBlobStore(), attestation=provider)
    yield server
    server.close()


@pytest.fixture
def client(server: EnclaveServer) -> Iterator[EnclaveClient]:
    client = EnclaveClient(InProcessTransport(server.serve_connection), timeout=5.0)
    yield client
    client.close()


def test_a_fresh_document_binds_the_nonce_and_verifies(
    client: EnclaveClient, provider: SimulatedNsm
) -> None:
    nonce = bytes(range(MAX_ATTESTATION_NONCE))
    document = client.attestation(nonce)
    attested = verify_attestation(
        document,
        root_certificates=[provider.root_certificate],
        expected_pcrs={0: measure()[0]},
        nonce=nonce,
        max_age=None,
    )
    assert attested.nonce == nonce
    assert attested.user_data is None
    assert attested.public_key is None
    assert client.attestation(b"\x01") != document


def test_user_data_comes_from_the_hook_on_each_request(
    client: EnclaveClient, server: EnclaveServer, provider: SimulatedNsm
) -> None:
    policy, clients = b"version = 1\n", b"[[clients]]\n"
    server.app.attestation_user_data = lambda: (
        hashlib.sha256(policy).digest() + hashlib.sha256(clients).digest()
    )
    document = client.attestation(b"n")
    attested = verify_attestation(
        document, root_certificates=[provider.root_certificate], nonce=b"n", max_age=None
    )
    assert attested.user_data == hashlib.sha256(policy).digest() + hashlib.sha256(clients).digest()


@pytest.mark.parametrize("answer", ["text", b"x" * (MAX_USER_FIELD_SIZE + 1)])
def test_a_hook_giving_something_unusable_is_an_enclave_error(
    client: EnclaveClient, server: EnclaveServer, answer: object
) -> None:
    server.app.attestation_user_data = lambda: answer  # type: ignore[assignment, return-value]
    with pytest.raises(ConfigurationError, match="attestation_user_data"):
        client.attestation(b"n")


@pytest.mark.parametrize("nonce", [b"", b"x" * (MAX_ATTESTATION_NONCE + 1), "text", None])
def test_bad_nonces_are_refused_by_the_client(client: EnclaveClient, nonce: object) -> None:
    with pytest.raises(InvalidField) as refused:
        client.attestation(nonce)  # type: ignore[arg-type]
    assert refused.value.field == "nonce"


@pytest.mark.parametrize(
    "body",
    [{}, {"nonce": b""}, {"nonce": b"x" * (MAX_ATTESTATION_NONCE + 1)}, {"nonce": "00"}],
)
def test_bad_nonces_get_an_error_frame_from_the_enclave(
    server: EnclaveServer, body: dict[str, object]
) -> None:
    answer = server.app.handle(Frame(MessageType.ATTESTATION, 9, body))
    [frame] = FrameDecoder().feed(answer)
    assert isinstance(frame, Frame)
    assert frame.message_type is MessageType.ERROR and frame.request_id == 9
    error = error_from_body(frame.body)
    assert isinstance(error, InvalidField) and error.field == "nonce"


def test_an_enclave_without_a_provider_says_so() -> None:
    server = start_enclave(None, MemoryKms(), MemoryBlobStore())
    client = EnclaveClient(InProcessTransport(server.serve_connection), timeout=5.0)
    try:
        with pytest.raises(UnsupportedOperation, match="no attestation provider"):
            client.attestation(b"n")
        assert client.health()["status"] == "ok"
    finally:
        client.close()
        server.close()


class BrokenNsm(AttestationProvider):
    def _attest(
        self, user_data: bytes | None, nonce: bytes | None, public_key: bytes | None
    ) -> bytes:
        raise DependencyUnavailable("nsm: ioctl failed: Input/output error")


def test_an_nsm_failure_reaches_the_host_as_unavailable() -> None:
    server = start_enclave(None, MemoryKms(), MemoryBlobStore(), attestation=BrokenNsm())
    client = EnclaveClient(InProcessTransport(server.serve_connection), timeout=5.0)
    try:
        with pytest.raises(DependencyUnavailable, match="ioctl failed"):
            client.attestation(b"n")
    finally:
        client.close()
        server.close()
