"""HSM custody run by the enclave (``[hsm] in_enclave = true``): SoftHSM2 inside ``signd enclave``.

The host side is :class:`EnclaveHsmBackend`; it must behave like the host-side HsmBackend:
same records, same signatures, the same error classes for a wrong PIN or a vanished token.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import coincurve
import pytest
from eth_account import Account
from pkcs11 import exceptions as p11

from signd.chains import address_deriver
from signd.crypto.secp256k1 import HALF_CURVE_ORDER, RecoverableSignature
from signd.custody.enclave import EnclaveBackend, EnclaveHsmBackend
from signd.custody.hsm import HsmBackend, HsmToken
from signd.custody.hsm.library import PinRefused
from signd.custody.hsm.pool import PooledSession
from signd.enclave.client import EnclaveClient
from signd.enclave.hsm import EnclaveHsm
from signd.enclave.protocol import (
    HEADER_SIZE,
    Frame,
    FrameDecoder,
    HsmKeyReference,
    MessageType,
    encode_frame,
    error_from_body,
)
from signd.enclave.server import EnclaveServer, start_enclave
from signd.enclave.transport import InProcessTransport, UnixTransport
from signd.errors import (
    AccessDenied,
    CapacityExceeded,
    ConfigurationError,
    CustodyUnsupported,
    DependencyUnavailable,
    InvalidField,
    InvalidRequest,
    SigndError,
)
from signd.storage.sqlite import SqliteMetadataStore
from tests.cli.conftest import Cli, cli  # noqa: F401
from tests.cli.test_custody_tiers import check_signing
from tests.custody.hsm.conftest import MAIN_TOKEN, USER_PIN, SoftHsm
from tests.enclave.fakes import FakeClock, MemoryBlobStore, MemoryKms

REPO = Path(__file__).resolve().parents[3]
LOSS_TOKEN = "enclave-loss"
WRONG_PIN = "not-the-pin-7731"
eth_address = address_deriver("ethereum")

pytestmark = pytest.mark.integration


def ethereum_sender(signature: RecoverableSignature, digest: bytes) -> str:
    """The Ethereum address that signed ``digest``, recovered by eth-account."""
    return str(Account._recover_hash(digest, vrs=(signature.recovery_id, signature.r, signature.s)))


def check_signature(
    address: str, public_key: bytes, signature: RecoverableSignature, digest: bytes
) -> None:
    assert 0 < signature.s <= HALF_CURVE_ORDER
    der = coincurve.ecdsa.cdata_to_der(
        coincurve.ecdsa.deserialize_compact(signature.to_bytes()[:64])
    )
    assert coincurve.PublicKey(public_key).verify(der, digest, hasher=None)
    assert ethereum_sender(signature, digest) == address


# -- the enclave's HSM connection, without a token


class RefusingToken:
    def __init__(self, error: type[SigndError]) -> None:
        self.error = error
        self.attempts = 0

    def __call__(self) -> HsmToken:
        self.attempts += 1
        raise self.error("the HSM said no")


def test_a_refused_pin_is_never_tried_again_other_failures_after_the_interval() -> None:
    clock = FakeClock()
    refused = RefusingToken(PinRefused)
    hsm = EnclaveHsm(refused, retry_interval=5.0, clock=clock)
    hsm.start()
    for _ in range(3):
        clock.advance(60)
        with pytest.raises(PinRefused, match="the HSM said no"):
            hsm.sign_digest(HsmKeyReference("k", b"\x01"), b"\x00" * 32)
    assert refused.attempts == 1

    down = RefusingToken(DependencyUnavailable)
    hsm = EnclaveHsm(down, retry_interval=5.0, clock=clock)
    hsm.start()
    with pytest.raises(DependencyUnavailable):
        hsm.check_health()
    assert down.attempts == 1
    clock.advance(5.0)
    with pytest.raises(DependencyUnavailable):
        hsm.create_keys("ethereum", 1)
    assert down.attempts == 2
    with pytest.raises(InvalidField):
        hsm.create_keys("ethereum", 0)


# -- in-process: the enclave app with a real SoftHSM2 token, the host backend over a socket pair


@pytest.fixture
def hsm_enclave(softhsm: SoftHsm) -> Iterator[EnclaveServer]:
    hsm = EnclaveHsm(lambda: HsmToken(softhsm.settings(pool_size=2)))
    server = start_enclave(None, MemoryKms(), MemoryBlobStore(), hsm=hsm)
    yield server
    server.close()
    hsm.close()


@pytest.fixture
def client(hsm_enclave: EnclaveServer) -> Iterator[EnclaveClient]:
    client = EnclaveClient(InProcessTransport(hsm_enclave.serve_connection), timeout=10.0)
    yield client
    client.close()


@pytest.fixture
def in_enclave(client: EnclaveClient, metadata: SqliteMetadataStore) -> EnclaveHsmBackend:
    return EnclaveHsmBackend(client, metadata, batch_size=2)


def test_keys_made_in_the_enclave_are_recorded_on_the_host_like_host_side_hsm_keys(
    in_enclave: EnclaveHsmBackend, metadata: SqliteMetadataStore, softhsm: SoftHsm
) -> None:
    seen: list[int] = []
    keys = in_enclave.create_keys("ethereum", eth_address, 5, labels=["hot"], progress=seen.append)
    assert seen == [2, 4, 5]
    with HsmBackend(softhsm.settings(), metadata) as host_side:  # closed: its login ends
        on_token = {key.label: key for key in host_side.list_token_keys()}
    for key in keys:
        assert key.custody == "hsm"
        assert key.address == eth_address(key.public_key)
        assert key.details["cka_label"] == f"signd-{key.key_id}"
        token_key = on_token[key.details["cka_label"]]
        assert token_key.cka_id.hex() == key.details["cka_id"]
        assert token_key.public_key == key.public_key
        assert in_enclave.find_key(key.address) == key
    assert [k.key_id for k in in_enclave.list_keys(label="hot").keys] == [k.key_id for k in keys]


def test_signatures_from_the_enclave_token_verify_and_recover_the_sender(
    in_enclave: EnclaveHsmBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    (key,) = in_enclave.create_keys("ethereum", eth_address)
    device_s: list[int] = []
    original = PooledSession.sign

    def spy(self: PooledSession, cka_id: bytes, digest: bytes) -> bytes:
        raw = original(self, cka_id, digest)
        device_s.append(int.from_bytes(raw[32:], "big"))
        return raw

    monkeypatch.setattr(PooledSession, "sign", spy)
    for _ in range(100):
        digest = os.urandom(32)
        check_signature(key.address, key.public_key, in_enclave.sign_digest(key, digest), digest)
    assert any(s > HALF_CURVE_ORDER for s in device_s), "high-S from the token was normalised"
    digests = [os.urandom(32) for _ in range(7)]
    batch = in_enclave.sign_digests([(key.key_id, d) for d in digests])
    for signature, digest in zip(batch, digests, strict=True):
        check_signature(key.address, key.public_key, signature, digest)


def test_the_same_records_work_with_the_host_side_backend_and_back(
    in_enclave: EnclaveHsmBackend, metadata: SqliteMetadataStore, softhsm: SoftHsm
) -> None:
    (made_in_enclave,) = in_enclave.create_keys("ethereum", eth_address)
    host_side = HsmBackend(softhsm.settings(pool_size=1), metadata)
    try:
        (made_on_host,) = host_side.create_keys("ethereum", eth_address)
        for key in (made_in_enclave, made_on_host):
            digest = os.urandom(32)
            for backend in (in_enclave, host_side):
                signature = backend.sign_digest(key.key_id, digest)
                check_signature(key.address, key.public_key, signature, digest)
    finally:
        host_side.close()


def test_a_full_token_records_the_keys_made_before_and_raises_capacity_exceeded(
    in_enclave: EnclaveHsmBackend, metadata: SqliteMetadataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = HsmToken._generate
    calls = 0

    def generate_until_full(pooled: PooledSession, cka_id: bytes, label: str) -> bytes:
        nonlocal calls
        calls += 1
        if calls > 3:
            raise p11.DeviceMemory()
        return original(pooled, cka_id, label)

    monkeypatch.setattr(HsmToken, "_generate", staticmethod(generate_until_full))
    before = len(metadata.list(custody="hsm", limit=1000).records)
    with pytest.raises(CapacityExceeded):
        in_enclave.create_keys("ethereum", eth_address, 6)
    assert len(metadata.list(custody="hsm", limit=1000).records) == before + 3
    with pytest.raises(CapacityExceeded):
        in_enclave.create_keys("ethereum", eth_address, 1)
    assert len(metadata.list(custody="hsm", limit=1000).records) == before + 3


def test_a_token_without_secp256k1_in_the_enclave_is_custody_unsupported_on_the_host(
    in_enclave: EnclaveHsmBackend, metadata: SqliteMetadataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The enclave's token refuses the curve (CKR_CURVE_NOT_SUPPORTED, which python-pkcs11
    does not know) or the mechanism: the host gets the same 503 class and message, for a
    create (nothing recorded), a signature and the health check."""
    (key,) = in_enclave.create_keys("ethereum", eth_address)
    before = len(metadata.list(custody="hsm", limit=1000).records)

    def curve_refused(pooled: PooledSession, cka_id: bytes, label: str) -> bytes:
        raise p11.PKCS11Error("Unmapped error code 0x140")

    def mechanism_refused(self: PooledSession, cka_id: bytes, digest: bytes) -> bytes:
        raise p11.MechanismInvalid()

    monkeypatch.setattr(HsmToken, "_generate", staticmethod(curve_refused))
    with pytest.raises(CustodyUnsupported) as created:
        in_enclave.create_keys("ethereum", eth_address)
    assert created.value.http_status == 503
    assert "does not support secp256k1: it refused generating" in created.value.message
    assert "with CurveNotSupported" in created.value.message
    assert len(metadata.list(custody="hsm", limit=1000).records) == before
    monkeypatch.setattr(PooledSession, "sign", mechanism_refused)
    with pytest.raises(CustodyUnsupported, match="refused signing with MechanismInvalid"):
        in_enclave.sign_digest(key, os.urandom(32))
    with pytest.raises(CustodyUnsupported, match="does not support secp256k1"):
        in_enclave.check_health()
    monkeypatch.undo()
    in_enclave.create_keys("ethereum", eth_address)
    digest = os.urandom(32)
    check_signature(key.address, key.public_key, in_enclave.sign_digest(key, digest), digest)
    in_enclave.check_health()


def test_the_enclave_offers_hsm_custody_and_health_checks_the_token(
    client: EnclaveClient, in_enclave: EnclaveHsmBackend
) -> None:
    in_enclave.check_health()
    client.require_custody("hsm")
    assert client.health("hsm")["status"] == "ok"


def test_an_enclave_without_hsm_refuses_hsm_custody(
    metadata: SqliteMetadataStore,
) -> None:
    server = start_enclave(None, MemoryKms(), MemoryBlobStore())
    client = EnclaveClient(InProcessTransport(server.serve_connection), timeout=5.0)
    try:
        backend = EnclaveHsmBackend(client, metadata)
        for call in (
            lambda: backend.create_keys("ethereum", eth_address),
            backend.check_health,
        ):
            with pytest.raises(ConfigurationError, match="does not hold hsm custody"):
                call()
        (sealed,) = EnclaveBackend(client, metadata).create_keys("ethereum", eth_address)
        assert sealed.custody == "enclave"
    finally:
        client.close()
        server.close()


def test_custody_is_refused_in_version_1_frames_and_unknown_custody_is_invalid(
    hsm_enclave: EnclaveServer,
) -> None:
    app = hsm_enclave.app
    request = {"chain": "ethereum", "count": 1, "custody": "hsm"}

    def answer(frame: bytes) -> dict[str, object]:
        return dict(cbor2.loads(frame[HEADER_SIZE:]))

    def ask(
        version: int, body: dict[str, object], kind: MessageType = MessageType.CREATE_KEYS
    ) -> bytes:
        (event,) = FrameDecoder().feed(encode_frame(kind, 5, body, version=version))
        assert isinstance(event, Frame)
        return app.handle(event)

    old_client = answer(ask(1, {"versions": [1]}, MessageType.HELLO))
    assert old_client["version"] == 1
    assert old_client["custody"] == ["enclave", "hsm"]
    assert answer(ask(1, {"versions": [1, 2]}, MessageType.HELLO))["version"] == 2

    refused = ask(1, request)
    assert refused[5] == MessageType.ERROR
    assert isinstance(error_from_body(answer(refused)), InvalidRequest)
    unknown = ask(2, {**request, "custody": "vault"})
    assert answer(unknown)["field"] == "custody"
    made = ask(2, request)
    assert made[5] == MessageType.CREATE_KEYS
    (key,) = answer(made)["keys"]  # type: ignore[misc]
    assert set(key) == {"key_id", "chain", "address", "public_key", "cka_id", "label"}


# -- a real `signd enclave` process with SoftHSM2 inside


class HsmEnclaveProcess:
    """``signd enclave`` with ``in_enclave`` HSM custody, configured by its environment only."""

    def __init__(self, home: Path, softhsm: SoftHsm, token: str, pin: str) -> None:
        self.home = home
        self.socket_path = f"/tmp/signd-hsm-{os.getpid()}-{time.monotonic_ns()}.sock"
        self.log = home / "enclave.log"
        self.env = {
            **os.environ,
            "SOFTHSM2_CONF": str(softhsm.conf),
            "SIGND_HSM_IN_ENCLAVE": "true",
            "SIGND_HSM_MODULE": str(softhsm.module),
            "SIGND_HSM_TOKEN_LABEL": token,
            "SIGND_HSM_PIN": pin,
            "SIGND_HSM_RECONNECT_INTERVAL": "0",
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "signd",
                    "--home",
                    str(self.home),
                    "enclave",
                    "--listen",
                    "unix://" + self.socket_path,
                    "--allow-bare",  # these tests drive the enclave's HSM with bare requests
                ],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=log,
            )
        probe = EnclaveClient(UnixTransport(self.socket_path), connect_timeout=0.2)
        deadline = time.monotonic() + 20
        try:
            while True:
                try:
                    probe.health()
                    return
                except DependencyUnavailable:
                    assert self.process.poll() is None, self.log.read_text()
                    assert time.monotonic() < deadline, "the enclave did not come up"
                    time.sleep(0.05)
        finally:
            probe.close()

    def client(self) -> EnclaveClient:
        return EnclaveClient(UnixTransport(self.socket_path), timeout=20.0)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)


@pytest.fixture(scope="module")
def loss_token(softhsm: SoftHsm) -> str:
    softhsm.init_token(LOSS_TOKEN)
    return LOSS_TOKEN


@pytest.fixture
def spawn(tmp_path: Path, softhsm: SoftHsm) -> Iterator[type[HsmEnclaveProcess]]:
    started: list[HsmEnclaveProcess] = []

    def make(token: str = MAIN_TOKEN, pin: str = USER_PIN) -> HsmEnclaveProcess:
        process = HsmEnclaveProcess(tmp_path / f"enclave-{len(started)}", softhsm, token, pin)
        started.append(process)
        process.start()
        return process

    yield make  # type: ignore[misc]
    for process in started:
        process.stop()


def test_a_real_enclave_process_creates_and_signs_with_its_hsm(
    spawn: type[HsmEnclaveProcess], tmp_path: Path
) -> None:
    enclave = spawn()
    client = enclave.client()
    backend = EnclaveHsmBackend(client, SqliteMetadataStore(tmp_path / "host.db"))
    try:
        keys = backend.create_keys("ethereum", eth_address, 3)
        for key in keys:
            digest = os.urandom(32)
            check_signature(key.address, key.public_key, backend.sign_digest(key, digest), digest)
        backend.check_health()
    finally:
        backend.close()


def test_a_wrong_pin_in_the_enclave_is_unavailable_on_the_host_and_never_shown(
    spawn: type[HsmEnclaveProcess], tmp_path: Path
) -> None:
    enclave = spawn(pin=WRONG_PIN)
    client = enclave.client()
    metadata = SqliteMetadataStore(tmp_path / "host.db")
    backend = EnclaveHsmBackend(client, metadata)
    try:
        for call in (lambda: backend.create_keys("ethereum", eth_address), backend.check_health):
            with pytest.raises(DependencyUnavailable) as raised:
                call()
            assert "refused signd's PIN: the HSM PIN is incorrect" in raised.value.message
            assert WRONG_PIN not in json.dumps(raised.value.to_dict())
        (sealed,) = EnclaveBackend(client, metadata).create_keys("ethereum", eth_address)
        digest = os.urandom(32)
        sealed_backend = EnclaveBackend(client, metadata)
        assert sealed_backend.sign_digest(sealed, digest).recover_public_key(digest) == (
            sealed.public_key
        ), "sealed-key custody keeps working while the HSM refuses the PIN"
    finally:
        backend.close()
    enclave.stop()
    log = enclave.log.read_text()
    assert "HSM custody is unavailable" in log
    assert WRONG_PIN not in log


def test_a_token_gone_from_the_enclave_is_dependency_unavailable_then_recovers(
    spawn: type[HsmEnclaveProcess], softhsm: SoftHsm, loss_token: str, tmp_path: Path
) -> None:
    enclave = spawn(token=loss_token)
    backend = EnclaveHsmBackend(enclave.client(), SqliteMetadataStore(tmp_path / "host.db"))
    try:
        (key,) = backend.create_keys("ethereum", eth_address)
        backend.sign_digest(key, os.urandom(32))
        folder = softhsm.token_dir(loss_token)
        parked = tmp_path / "parked-token"
        shutil.move(folder, parked)
        try:
            for _ in range(2):
                with pytest.raises(DependencyUnavailable) as raised:
                    backend.sign_digest(key, os.urandom(32))
                assert "HSM" in raised.value.message
            with pytest.raises(DependencyUnavailable):
                backend.check_health()
        finally:
            shutil.move(parked, folder)
        digest = os.urandom(32)
        check_signature(key.address, key.public_key, backend.sign_digest(key, digest), digest)
    finally:
        backend.close()


# -- the CLI, with SIGND_HSM_IN_ENCLAVE=true: `signd` starts its local enclave, which holds the HSM


@pytest.fixture
def in_enclave_cli(
    cli: Cli,  # noqa: F811
    softhsm: SoftHsm,
    monkeypatch: pytest.MonkeyPatch,
) -> Cli:
    monkeypatch.setenv("SIGND_HSM_IN_ENCLAVE", "true")
    monkeypatch.setenv("SIGND_HSM_MODULE", str(softhsm.module))
    monkeypatch.setenv("SIGND_HSM_TOKEN_LABEL", MAIN_TOKEN)
    monkeypatch.setenv("SIGND_HSM_PIN", USER_PIN)
    return cli


def test_hsm_custody_in_the_enclave_through_the_cli(in_enclave_cli: Cli) -> None:
    keys = in_enclave_cli.run("keys", "new", "--custody", "hsm", "--count", "2", "--json")["keys"]
    assert {k["custody"] for k in keys} == {"hsm"}
    assert all(len(k["details"]["cka_id"]) == 32 for k in keys)
    check_signing(in_enclave_cli, keys[1])
    log = (in_enclave_cli.home / "run" / "enclave.log").read_text()
    assert "HSM custody connected" in log


def test_a_wrong_pin_through_the_cli_is_unavailable_without_the_pin(
    in_enclave_cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIGND_HSM_PIN", WRONG_PIN)
    out = in_enclave_cli.run("keys", "new", "--custody", "hsm", "--json", ok=False)
    assert out["error"]["code"] == "dependency_unavailable"
    assert WRONG_PIN not in json.dumps(out)
    assert WRONG_PIN not in (in_enclave_cli.home / "run" / "enclave.log").read_text()


def test_sealed_and_hsm_custody_share_one_local_enclave(
    in_enclave_cli: Cli,
) -> None:
    from signd.config import load_settings
    from signd.operations.backends import build_signer

    signer = build_signer(load_settings(in_enclave_cli.home))
    sealed, hsm = signer.backend("enclave"), signer.backend("hsm")
    assert isinstance(sealed, EnclaveBackend) and isinstance(hsm, EnclaveHsmBackend)
    (sealed_key,) = sealed.create_keys("ethereum", eth_address)
    (hsm_key,) = hsm.create_keys("ethereum", eth_address)
    local = sealed._share.shared.local  # type: ignore[attr-defined]
    assert local is hsm._share.shared.local  # type: ignore[attr-defined]
    assert local is not None and local.pid is not None
    hsm.close()
    hsm.close()
    digest = os.urandom(32)
    assert sealed.sign_digest(sealed_key, digest).recover_public_key(digest) == (
        sealed_key.public_key
    ), "closing one custody leaves the shared enclave to the other"
    signer.close()
    assert local.pid is None, "the last custody to close stops the local enclave"
    assert hsm_key.details["cka_label"].endswith(hsm_key.key_id)


def test_the_enclave_gets_what_its_hsm_needs_from_the_hosts_environment(
    softhsm: SoftHsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an allowlisted environment the local enclave still gets all that HSM custody in
    it reads: ``SIGND_HSM_*``, the variable ``pin = "env:NAME"`` names and ``SOFTHSM2_CONF``
    (set for the session by the fixture); a secret of the host's that it does not read stays
    out. It makes a key on the token and signs with it."""
    from signd.config import load_settings
    from signd.operations.backends import build_signer
    from tests.enclave.test_local_process import enclave_process, process_environment

    monkeypatch.setenv("SIGND_HSM_MODULE", str(softhsm.module))
    monkeypatch.setenv("SIGND_HSM_TOKEN_LABEL", MAIN_TOKEN)
    monkeypatch.setenv("SIGND_TEST_ENCLAVE_HSM_PIN", USER_PIN)
    monkeypatch.setenv("WALLET_BACKUP_PASSPHRASE", "canary passphrase of something else")
    home = tmp_path / "home"
    home.mkdir()
    (home / "signd.toml").write_text(
        '[custody]\nenabled = ["hsm"]\n\n'
        '[hsm]\nin_enclave = true\npin = "env:SIGND_TEST_ENCLAVE_HSM_PIN"\n'
    )
    with build_signer(load_settings(home)) as signer:
        hsm = signer.backend("hsm")
        assert isinstance(hsm, EnclaveHsmBackend)
        (key,) = hsm.create_keys("ethereum", eth_address)
        digest = os.urandom(32)
        check_signature(key.address, key.public_key, hsm.sign_digest(key, digest), digest)
        environment = process_environment(enclave_process(home))
    if environment is None:
        pytest.skip("signed; the running enclave's environ needs root to be read")
    assert environment["SOFTHSM2_CONF"] == str(softhsm.conf)
    assert environment["SIGND_TEST_ENCLAVE_HSM_PIN"] == USER_PIN
    assert "WALLET_BACKUP_PASSPHRASE" not in environment


# -- through the enclave's gate: the enclave signs with its HSM itself, and only there


@pytest.fixture
def gated_hsm(tmp_path: Path, softhsm: SoftHsm) -> Iterator[Any]:
    """The gated app over a gate-only in-process enclave that holds SoftHSM2 custody."""
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from starlette.testclient import TestClient

    from signd.api import ApiSettings
    from signd.gate import GatePaths
    from tests.gate.support import POLICY, clients_toml, gated_service

    alice = ed25519.Ed25519PrivateKey.generate()

    def write_files(paths: GatePaths) -> None:
        paths.clients_file.write_text(clients_toml(alice, ed25519.Ed25519PrivateKey.generate()))
        paths.policy_file.write_text(POLICY)

    hsm = EnclaveHsm(lambda: HsmToken(softhsm.settings(pool_size=2)))
    home = tmp_path / "home"
    try:
        with (
            gated_service(home, "enclave", ApiSettings(), write_files, hsm=hsm) as service,
            TestClient(service.app) as client,
        ):
            yield client, alice, service.signer, home
    finally:
        hsm.close()


def _signed(gated: Any, path: str, body: Any) -> Any:
    from signd.auth import sign_request

    client, alice, _, _ = gated
    content = json.dumps(body).encode()
    headers = {**sign_request("POST", path, content, "alice", alice)}
    headers["content-type"] = "application/json"
    return client.post(path, content=content, headers=headers)


def _new_hsm_key(gated: Any) -> dict[str, Any]:
    made = _signed(gated, "/v1/keys", {"chain": "ethereum", "custody": "hsm", "labels": ["hot"]})
    assert made.status_code == 201, made.text
    key: dict[str, Any] = made.json()["keys"][0]
    return key


def _transfer(key: dict[str, Any], nonce: int, to: str | None = None) -> Any:
    from tests.gate.support import RECIPIENT

    return {
        "key": key["address"],
        "transaction": {
            "type": "0x2",
            "chainId": "0x1",
            "nonce": hex(nonce),
            "to": to or RECIPIENT,
            "value": "0x1",
            "gas": "0x5208",
            "maxFeePerGas": "0x3b9aca00",
            "maxPriorityFeePerGas": "0x1",
        },
    }


def _last_record(home: Path) -> dict[str, Any]:
    from signd.audit import SealedAuditRecord

    line = (home / "audit.log").read_bytes().splitlines()[-1]
    record: dict[str, Any] = json.loads(SealedAuditRecord.from_json(line).to_json())["record"]
    return record


def test_the_gate_signs_with_the_enclaves_hsm_and_nothing_signs_around_it(
    gated_hsm: Any,
) -> None:
    _, _, signer, home = gated_hsm
    key = _new_hsm_key(gated_hsm)
    signed = _signed(gated_hsm, "/v1/sign/ethereum/transaction", _transfer(key, 0))
    assert signed.status_code == 200, signed.text
    assert Account.recover_transaction(signed.json()["raw_transaction"]) == key["address"]
    assert "signed by the enclave's HSM" in _last_record(home)["reason"]
    refused = _signed(
        gated_hsm, "/v1/sign/ethereum/transaction", _transfer(key, 1, to="0x" + "12" * 20)
    )
    assert (refused.status_code, refused.json()["error"]["rule"]) == (403, "hot-eth")

    backend = signer.backend("hsm")
    assert isinstance(backend, EnclaveHsmBackend)
    info = signer.get_key(key["address"])
    with pytest.raises(AccessDenied, match="outside its gate"):
        backend.sign_digest(info, bytes(32))  # the bare request a taken-over host would send


def test_an_hsm_object_swapped_by_the_host_signs_nothing(gated_hsm: Any) -> None:
    """The host names the token object: naming another key's object for an allowed call is
    caught in the enclave, which releases no signature and audits the refusal."""
    import sqlite3

    home = gated_hsm[3]
    first, second = _new_hsm_key(gated_hsm), _new_hsm_key(gated_hsm)
    with sqlite3.connect(home / "metadata.db") as database:
        [(details,)] = database.execute(
            "SELECT details FROM key_records WHERE key_id = ?", (second["key_id"],)
        ).fetchall()
        database.execute(
            "UPDATE key_records SET details = ? WHERE key_id = ?", (details, first["key_id"])
        )
    response = _signed(gated_hsm, "/v1/sign/ethereum/transaction", _transfer(first, 0))
    assert response.status_code == 500, response.text
    assert response.json()["error"]["code"] == "integrity_error"
    record = _last_record(home)
    assert (record["decision"], record["key_id"]) == ("refused", first["key_id"])
    assert "signs with another key" in record["reason"]
