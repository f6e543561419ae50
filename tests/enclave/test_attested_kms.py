"""The enclave's KMS client in recipient mode, and the embedded kms-server's lifecycle (in-process).

The end-to-end versions (a real enclave process, a PCR0 change, a forging host) are in
tests/integration/test_attested_kms.py.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from signd.attestation import SimulatedNsm, measure
from signd.config import load_settings
from signd.enclave.signer import EnclaveSigner
from signd.errors import AccessDenied, ConfigurationError, DependencyUnavailable, IntegrityError
from signd.kms.aws import AwsKms
from signd.kms.cms import seal_for_recipient
from signd.kms.local import LocalKms
from signd.kms.recipient import Recipient
from signd.kms.server import attestation_key_policy, start_kms_server
from signd.kms.server.http import answers
from signd.operations.components import build_kms
from signd.operations.local_kms import ATTESTED_ALIAS, EmbeddedKms, LocalKmsServer
from tests.enclave.fakes import MemoryBlobStore
from tests.fixtures.servers import squatter

CONTEXT = {"service": "signd", "purpose": "test"}
ROOT = "arn:aws:iam::111122223333:root"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def nsm(home: Path) -> SimulatedNsm:
    return SimulatedNsm(home / "attestation" / "dev-ca")


@pytest.fixture
def recipient(nsm: SimulatedNsm, rsa_key: rsa.RSAPrivateKey) -> Recipient:
    return Recipient(nsm, rsa_key)


@pytest.fixture
def server(home: Path, nsm: SimulatedNsm) -> Iterator[Any]:
    with start_kms_server(home) as running:
        yield running


def pinned_key(server: Any, pcr0: bytes) -> str:
    client = server.client()
    policy = attestation_key_policy(enclave_principal=ROOT, admin_principal=ROOT, pcrs={0: pcr0})
    created = client.create_key(Policy=json.dumps(policy))
    key_id: str = created["KeyMetadata"]["KeyId"]
    return key_id


def test_recipient_mode_round_trips_a_data_key_kms_never_sends_in_clear(
    server: Any, nsm: SimulatedNsm, recipient: Recipient
) -> None:
    key_id = pinned_key(server, nsm.pcrs[0])
    kms = AwsKms(key_id, client=server.client(), recipient=recipient)
    data_key = kms.generate_data_key(encryption_context=CONTEXT)
    assert kms.decrypt(data_key.ciphertext, encryption_context=CONTEXT) == data_key.plaintext
    raw = server.client().generate_data_key(
        KeyId=key_id, KeySpec="AES_256", Recipient=recipient.parameter()
    )
    assert "Plaintext" not in raw and raw["CiphertextForRecipient"]
    assert "rsa=2048" in repr(recipient) and "recipient" in repr(kms)


def test_a_key_pinned_to_another_pcr0_is_refused_and_so_is_a_plain_request(
    server: Any, recipient: Recipient
) -> None:
    key_id = pinned_key(server, b"\x01" * 48)
    with pytest.raises(AccessDenied, match="KMS refused GenerateDataKey"):
        AwsKms(key_id, client=server.client(), recipient=recipient).generate_data_key()
    own = pinned_key(server, measure()[0])
    with pytest.raises(AccessDenied):
        AwsKms(own, client=server.client()).generate_data_key()


def test_the_enclave_signer_creates_and_signs_through_recipient_mode(
    server: Any, nsm: SimulatedNsm, recipient: Recipient
) -> None:
    kms = AwsKms(pinned_key(server, nsm.pcrs[0]), client=server.client(), recipient=recipient)
    blobs = MemoryBlobStore()
    signer = EnclaveSigner(kms, blobs)
    created = signer.create_keys("ethereum", 2)
    fresh = EnclaveSigner(kms, blobs)
    assert fresh.sign_digest(created[1].reference, b"\x07" * 32).to_bytes()


class FakeKmsClient:
    """Answers GenerateDataKey/Decrypt with whatever the test put in ``answer``."""

    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer = answer
        self.requests: list[dict[str, Any]] = []

    def generate_data_key(self, **request: Any) -> dict[str, Any]:
        self.requests.append(request)
        return self.answer

    def decrypt(self, **request: Any) -> dict[str, Any]:
        self.requests.append(request)
        return self.answer


def test_a_plaintext_answer_is_refused_in_recipient_mode(
    recipient: Recipient, rsa_key: rsa.RSAPrivateKey
) -> None:
    data_key = bytes(range(32))
    sealed = seal_for_recipient(data_key, rsa_key.public_key())
    honest = {"CiphertextForRecipient": sealed, "CiphertextBlob": b"blob", "KeyId": "k"}
    client = FakeKmsClient(honest)
    kms = AwsKms("k", client=client, recipient=recipient)  # type: ignore[arg-type]
    assert kms.decrypt(b"blob").reveal_bytes() == data_key
    assert client.requests[0]["Recipient"]["KeyEncryptionAlgorithm"] == "RSAES_OAEP_SHA_256"
    client.answer = {**honest, "Plaintext": data_key}
    for call in (kms.generate_data_key, lambda: kms.decrypt(b"blob")):
        with pytest.raises(IntegrityError, match="plaintext data key in recipient mode") as caught:
            call()
        assert base64.b64encode(data_key).decode() not in str(caught.value)
    client.answer = {"Plaintext": data_key, "CiphertextBlob": b"blob", "KeyId": "k"}
    with pytest.raises(IntegrityError):
        kms.generate_data_key()
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    client.answer = {
        **honest,
        "CiphertextForRecipient": seal_for_recipient(data_key, other.public_key()),
    }
    with pytest.raises(IntegrityError):
        kms.decrypt(b"blob")
    client.answer = {"CiphertextBlob": b"blob", "KeyId": "k", "ResponseMetadata": {}}
    with pytest.raises(IntegrityError) as caught:
        kms.generate_data_key()
    assert caught.value.message == (
        "KMS answered without CiphertextForRecipient (its fields: CiphertextBlob, KeyId)"
    )


@pytest.mark.parametrize("attested", [True, False], ids=["recipient", "plain"])
@pytest.mark.parametrize("answer", [{}, {"ResponseMetadata": {}}, {"CiphertextBlob": b"blob"}])
def test_an_answer_that_is_not_a_data_key_answer_is_kms_unavailable(
    recipient: Recipient, attested: bool, answer: dict[str, Any]
) -> None:
    """Every GenerateDataKey and Decrypt answer names its key: one without ``KeyId`` (such
    as ``200 {}`` from whatever answers on a restarted kms-server's port) is 503, not a
    broken KMS (500), and the next call is asked again."""
    client = FakeKmsClient(answer)
    kms = AwsKms("k", client=client, recipient=recipient if attested else None)  # type: ignore[arg-type]
    for operation, call in (
        ("GenerateDataKey", kms.generate_data_key),
        ("Decrypt", lambda: kms.decrypt(b"blob")),
    ):
        with pytest.raises(DependencyUnavailable) as caught:
            call()
        assert caught.value.message.startswith(f"KMS answered {operation} without a KeyId")
    assert len(client.requests) == 2


def test_a_data_key_answer_without_its_ciphertext_is_kms_unavailable(
    recipient: Recipient, rsa_key: rsa.RSAPrivateKey
) -> None:
    """A data key KMS does not also give wrapped could never be unwrapped again: refused."""
    sealed = seal_for_recipient(bytes(32), rsa_key.public_key())
    client = FakeKmsClient({"CiphertextForRecipient": sealed, "KeyId": "k"})
    kms = AwsKms("k", client=client, recipient=recipient)  # type: ignore[arg-type]
    with pytest.raises(DependencyUnavailable, match="GenerateDataKey without a CiphertextBlob"):
        kms.generate_data_key()
    assert kms.decrypt(b"blob").reveal_bytes() == bytes(32)  # a Decrypt answer has none


def test_the_attestation_document_is_reused_for_a_short_time(nsm: SimulatedNsm) -> None:
    now = [0.0]
    recipient = Recipient(nsm, document_max_age=60.0, clock=lambda: now[0])
    first = recipient.document()
    now[0] = 59.0
    assert recipient.document() is first
    now[0] = 60.0
    assert recipient.document() != first
    with pytest.raises(ConfigurationError):
        Recipient(nsm, rsa.generate_private_key(public_exponent=65537, key_size=1024))


# --------------------------------------------------------------------------- embedded kms-server


def test_the_embedded_kms_starts_owns_and_stops_its_server(
    home: Path, nsm: SimulatedNsm, recipient: Recipient
) -> None:
    kms = EmbeddedKms(home, recipient=recipient)
    assert not (home / "kms-server.json").exists()
    data_key = kms.generate_data_key(encryption_context=CONTEXT)
    assert kms.server.owned
    endpoint = json.loads((home / "kms-server.json").read_text())["endpoint"]
    assert kms.decrypt(data_key.ciphertext, encryption_context=CONTEXT) == data_key.plaintext
    kms.close()
    assert not answers(endpoint)
    with start_kms_server(home) as server:
        policy = server.client().get_key_policy(KeyId=ATTESTED_ALIAS, PolicyName="default")
        assert nsm.pcrs[0].hex() in policy["Policy"]


def test_the_embedded_kms_reuses_a_running_server_and_outlives_it(
    home: Path, recipient: Recipient
) -> None:
    server = start_kms_server(home)
    kms = EmbeddedKms(home, recipient=recipient)
    try:
        data_key = kms.generate_data_key()
        assert not kms.server.owned
        server.stop()
        assert kms.decrypt(data_key.ciphertext) == data_key.plaintext
        assert kms.server.owned
    finally:
        kms.close()
        server.stop()


def test_a_reused_server_is_left_running(home: Path) -> None:
    with start_kms_server(home) as server:
        kms = EmbeddedKms(home, recipient=None, server=LocalKmsServer(home))
        kms.check_health()
        kms.close()
        assert answers(server.endpoint)


def test_a_server_that_took_a_stopped_kms_servers_port_is_not_taken_for_it(
    home: Path, recipient: Recipient
) -> None:
    """The kms-server a client was using stops and something else listens on its port: the
    client starts a kms-server of its own instead of taking that other server's answers."""
    server = start_kms_server(home)
    kms = EmbeddedKms(home, recipient=recipient)
    try:
        data_key = kms.generate_data_key(encryption_context=CONTEXT)
        assert not kms.server.owned
        server.stop()
        port = urlsplit(server.endpoint).port
        assert port is not None
        with squatter(port) as other:
            assert not answers(server.endpoint)
            assert kms.decrypt(data_key.ciphertext, encryption_context=CONTEXT) == (
                data_key.plaintext
            )
            assert kms.server.owned
            # and a client that starts out with that endpoint recorded does the same
            fresh = EmbeddedKms(home, recipient=recipient)
            try:
                assert fresh.decrypt(data_key.ciphertext, encryption_context=CONTEXT) == (
                    data_key.plaintext
                )
            finally:
                fresh.close()
            assert other.requests >= 2, "the other server was not asked at all"
    finally:
        kms.close()
        server.stop()


def test_build_kms_defaults(home: Path) -> None:
    home.mkdir(parents=True)
    assert isinstance(build_kms(load_settings(home)), EmbeddedKms)
    (home / "signd.toml").write_text('[kms]\ntype = "local"\n')
    assert isinstance(build_kms(load_settings(home)), LocalKms)
    (home / "signd.toml").write_text('[kms]\ntype = "kms-server"\nkey_alias = "x"\n')
    with pytest.raises(ConfigurationError, match="key_alias"):
        build_kms(load_settings(home))
    (home / "signd.toml").unlink()
    LocalKms(home)
    assert isinstance(build_kms(load_settings(home)), LocalKms), "a home's earlier key stays"


def test_enclave_attestation_setting(home: Path) -> None:
    from signd.cli.services import _enclave_recipient

    home.mkdir(parents=True)
    assert isinstance(_enclave_recipient(load_settings(home)), Recipient)
    assert (home / "attestation" / "dev-ca" / "root.pem").exists()
    (home / "signd.toml").write_text('[enclave]\nattestation = "off"\n')
    assert _enclave_recipient(load_settings(home)) is None
    (home / "signd.toml").write_text('[enclave]\nattestation = "tpm"\n')
    with pytest.raises(ConfigurationError, match=r"enclave\.attestation"):
        _enclave_recipient(load_settings(home))
