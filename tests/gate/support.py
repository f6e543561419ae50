"""A gated service in-process: registered clients, a fixed policy, a real audit log."""

from __future__ import annotations

import base64
import errno
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

from signd.api import ApiSettings, create_app
from signd.api.enclave_gatekeeper import EnclaveGatekeeper, verify_in_enclave
from signd.api.gatekeeping import GatekeeperGate, Keeper, gatekeeper_authenticator
from signd.audit import SealedAuditRecord, verify_chain
from signd.auth import sign_request
from signd.config import load_settings
from signd.crypto.secret import Secret
from signd.custody.base import KeyInfo
from signd.custody.enclave import EnclaveBackend
from signd.enclave.server import start_enclave
from signd.gate import GatePaths, open_gatekeeper
from signd.gate.setup import load_mac_key
from signd.kms.base import KmsClient
from signd.kms.local import LocalKms
from signd.operations import Signer
from signd.operations.backends import build_signer
from signd.storage.blobs import FilesystemBlobStore

if TYPE_CHECKING:
    from signd.enclave.hsm import EnclaveHsm

PASSPHRASE = "gate tests: correct horse battery staple"
TOKEN = "bridge-token-for-tests"
RECIPIENT = "0x3535353535353535353535353535353535353535"
OTHER = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
TRANSFER = "0xa9059cbb"
MAX_PER_TX = 10**18
MAX_PER_WINDOW = 3 * 10**18
MAX_FEE_PER_TX = 10**16
MAX_FEE_PER_GAS = 200 * 10**9
GATE_MODES = ("host", "enclave")
"""Where the gate runs: in the service process, or in an (in-process) enclave server."""
BOTH_GATES = pytest.mark.parametrize("gate_mode", GATE_MODES, indirect=True)
"""Run a module's tests with both gates (``pytestmark = BOTH_GATES``)."""


def make_home(
    path: Path, enclave: str | None = None, *, enclave_hsm: bool = False, enclave_options: str = ""
) -> Path:
    """A signd home with a cheap-scrypt keystore, and enclave custody at ``enclave`` (a
    transport address) if given, with ``enclave_options`` (lines of its ``[enclave]``
    table), and HSM custody in that enclave if ``enclave_hsm``."""
    path.mkdir(parents=True, exist_ok=True)
    custody = '["enclave", "keystore"]' if enclave else '["keystore"]'
    transport = f'\n[enclave]\ntransport = "{enclave}"\n{enclave_options}' if enclave else ""
    if enclave_hsm:
        custody = '["enclave", "hsm", "keystore"]'
        transport += "\n[hsm]\nin_enclave = true\n"
    (path / "signd.toml").write_text(
        f"[keystore]\nscrypt_n = 1024\n\n[custody]\nenabled = {custody}\n{transport}"
    )
    return path


def open_signer(home: Path) -> Signer:
    return build_signer(load_settings(home), passphrase=lambda creating: Secret(PASSPHRASE))


def public_text(key: ed25519.Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes_raw()
    return "ed25519:" + base64.b64encode(raw).decode()


def clients_toml(alice: ed25519.Ed25519PrivateKey, reader: ed25519.Ed25519PrivateKey) -> str:
    return f"""
version = 1

[[clients]]
id = "alice"
scopes = ["keys:create", "keys:read", "sign:transaction", "sign:message", "sign:hash"]
key_labels = ["hot"]
public_key = "{public_text(alice)}"

[[clients]]
id = "reader"
scopes = ["keys:read"]
key_labels = ["*"]
public_key = "{public_text(reader)}"

[[clients]]
id = "bridge"
scopes = ["keys:read", "sign:transaction", "sign:message"]
key_labels = ["hot"]
token_sha256 = "{hashlib.sha256(TOKEN.encode()).hexdigest()}"
"""


POLICY = f"""
version = 1

[[rules]]
name = "hot-keys"
clients = ["alice"]
key_labels = ["hot"]
operations = ["keys:create"]
chains = ["ethereum"]

[[rules]]
name = "hot-eth"
clients = ["alice", "bridge"]
key_labels = ["hot"]
operations = ["sign:transaction"]
chains = ["ethereum"]
chain_ids = [1, 11155111]
to_allowlist = ["{RECIPIENT}"]
max_value_per_tx = "{MAX_PER_TX}"
max_value_per_window = "{MAX_PER_WINDOW}"
window_seconds = 3600
max_fee_per_tx = "{MAX_FEE_PER_TX}"
max_fee_per_gas = "{MAX_FEE_PER_GAS}"
contract_selectors = ["{TRANSFER}"]

[[rules]]
name = "hot-messages"
clients = ["alice", "bridge"]
key_labels = ["hot"]
operations = ["sign:message"]
chains = ["ethereum"]
"""


def operator_key(signer: Signer, home: Path, custody: str, labels: list[str]) -> KeyInfo:
    """A key made on the host by an operator (``signd keys new``), which no client may have
    asked for. A gate-only enclave makes no sealed key outside its gate, so a sealed one is
    made by an enclave of the operator's own (not gate-only) over the same KMS, blob store
    and metadata store, as ``signd keys new`` starts one."""
    if custody != "enclave":
        return signer.create_keys(chain="ethereum", custody=custody, labels=labels)[0]
    sockets = Path(tempfile.mkdtemp(prefix="signd-operator-"))
    address = f"unix://{sockets}/enclave.sock"
    server = start_enclave(address, LocalKms(home), FilesystemBlobStore(home / "blobs"))
    try:
        settings = load_settings(home).overriding("enclave", transport=address)
        with build_signer(settings, passphrase=lambda creating: Secret(PASSPHRASE)) as own:
            return own.create_keys(chain="ethereum", custody=custody, labels=labels)[0]
    finally:
        server.close()
        shutil.rmtree(sockets, ignore_errors=True)


BROAD_TOKEN = "broad-bearer-token"
BROAD_CLIENTS = f"""
version = 1

[[clients]]
id = "wallet"
scopes = ["keys:create", "keys:read", "sign:transaction", "sign:message", "sign:hash"]
key_labels = ["*"]
token_sha256 = "{hashlib.sha256(BROAD_TOKEN.encode()).hexdigest()}"
"""
BROAD_POLICY = """
version = 1

[[rules]]
name = "all-but-typed-data"
clients = ["wallet"]
key_labels = ["*"]
operations = ["keys:create", "sign:transaction", "sign:message", "sign:hash"]
chains = ["ethereum"]
blind_signing = true
allow_contract_creation = true
contract_selectors = ["0xa9059cbb"]

[[rules]]
name = "typed-data"
clients = ["wallet"]
key_labels = ["*"]
operations = ["sign:typed_data"]
chains = ["ethereum"]
eip712_domains = [{chainId = 1}]
"""


def broad_gate_files(paths: GatePaths) -> None:
    """One bearer client, ``wallet`` (token :data:`BROAD_TOKEN`), with every scope on every
    key, and a policy that lets well-formed requests through: for tests of bad input, which
    must reach the gate's own checks."""
    paths.clients_file.write_text(BROAD_CLIENTS)
    paths.policy_file.write_text(BROAD_POLICY)


@dataclass
class Gated:
    """A gated app, its gatekeeper, the files and the clients' keys."""

    client: TestClient
    gatekeeper: Keeper
    paths: GatePaths
    signer: Signer
    alice: ed25519.Ed25519PrivateKey
    reader: ed25519.Ed25519PrivateKey

    def signed(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        as_client: str = "alice",
        key: ed25519.Ed25519PrivateKey | None = None,
        now: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """A request signed as ``as_client`` (with its key unless ``key`` is given)."""
        content = b"" if body is None else json.dumps(body).encode()
        signing_key = key or (self.alice if as_client == "alice" else self.reader)
        auth = headers or sign_request(method, path, content, as_client, signing_key, now=now)
        return self.client.request(
            method,
            path,
            content=content,
            headers={**auth, "content-type": "application/json"},
        )

    def records(self) -> list[SealedAuditRecord]:
        return [
            SealedAuditRecord.from_json(line)
            for line in self.paths.audit_log.read_bytes().splitlines()
        ]

    def last(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self.records()[-1].record)


def assert_log_verifies(gatekeeper: Keeper, paths: GatePaths) -> int:
    """The audit log verifies whole (in the enclave when it holds the MAC key); its length."""
    lines = paths.audit_log.read_bytes().splitlines()
    if isinstance(gatekeeper, EnclaveGatekeeper):
        found = verify_in_enclave(gatekeeper.client, paths, lines)
        assert (found.problem, found.records) == (None, len(lines))
    else:
        records = [SealedAuditRecord.from_json(line) for line in lines]
        report = verify_chain(records, load_mac_key(paths.audit_key_file))
        assert report.ok and report.records == len(lines), report.problems
    return len(lines)


def gated_files(
    home: Path,
) -> tuple[GatePaths, ed25519.Ed25519PrivateKey, ed25519.Ed25519PrivateKey]:
    alice, reader = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    paths = GatePaths.under(home)
    paths.clients_file.write_text(clients_toml(alice, reader))
    paths.policy_file.write_text(POLICY)
    return paths, alice, reader


@pytest.fixture
def gate_mode(request: pytest.FixtureRequest) -> str:
    """``host`` unless a module asks for both (:data:`BOTH_GATES`)."""
    return str(getattr(request, "param", "host"))


@dataclass
class GatedService:
    """A gated app (not yet started) over its own signer, gatekeeper and files."""

    app: Starlette
    gatekeeper: Keeper
    paths: GatePaths
    signer: Signer


@contextmanager
def gated_service(
    home_path: Path,
    gate_mode: str,
    settings: ApiSettings,
    write_files: Callable[[GatePaths], None],
    *,
    hsm: EnclaveHsm | None = None,
    enclave_options: str = "",
    enclave_kms: Callable[[Path], KmsClient] = LocalKms,
) -> Iterator[GatedService]:
    """The gated app over a fresh home at ``home_path``, its gate files written by
    ``write_files``. With the enclave's gate, an enclave server runs in this process on a
    Unix socket, gate-only, with the KMS ``enclave_kms`` makes of the home, and keys in
    ``enclave`` custody are sealed by it; with ``hsm``, that enclave also holds HSM custody
    (the caller closes ``hsm`` afterwards). ``enclave_options``: see :func:`make_home`."""
    with ExitStack() as stack:
        address = None
        if gate_mode == "enclave":
            sockets = Path(tempfile.mkdtemp(prefix="signd-gate-"))
            stack.callback(shutil.rmtree, sockets, ignore_errors=True)
            address = f"unix://{sockets}/enclave.sock"
        home = make_home(
            home_path, address, enclave_hsm=hsm is not None, enclave_options=enclave_options
        )
        paths = GatePaths.under(home)
        write_files(paths)
        gatekeeper: Keeper
        if address is not None:
            server = start_enclave(  # gate-only, as signd serve runs it
                address,
                enclave_kms(home),
                FilesystemBlobStore(home / "blobs"),
                hsm=hsm,
                gate_only=True,
            )
            stack.callback(server.close)
        signer = stack.enter_context(open_signer(home))
        if address is not None:
            backend = signer.backend("enclave")
            assert isinstance(backend, EnclaveBackend)
            enclave_gatekeeper = EnclaveGatekeeper(  # with the settings' limits, as serve
                backend.client, signer, paths, node="test-node", limits=settings.limits()
            )
            enclave_gatekeeper.configure()
            gatekeeper = enclave_gatekeeper
        else:
            gatekeeper = open_gatekeeper(signer, paths, node="test-node", limits=settings.limits())
        stack.callback(gatekeeper.close)
        app = create_app(
            signer,
            settings,
            authenticate=gatekeeper_authenticator(gatekeeper, settings),
            gate=GatekeeperGate(gatekeeper),
        )
        yield GatedService(app, gatekeeper, paths, signer)


@contextmanager
def open_gated(home: Path, gate_mode: str, settings: ApiSettings | None = None) -> Iterator[Gated]:
    """The gated app (:func:`gated_service`) with alice, reader and bridge, and the fixed
    policy, started in a test client (blind signing on, unless ``settings`` say)."""
    alice, reader = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()

    def write_files(paths: GatePaths) -> None:
        paths.clients_file.write_text(clients_toml(alice, reader))
        paths.policy_file.write_text(POLICY)

    settings = settings or ApiSettings(allow_blind_signing=True)
    with (
        gated_service(home, gate_mode, settings, write_files) as service,
        TestClient(service.app) as client,
    ):
        yield Gated(client, service.gatekeeper, service.paths, service.signer, alice, reader)


@pytest.fixture
def gated(tmp_path: Path, gate_mode: str) -> Iterator[Gated]:
    """:func:`open_gated` over a fresh home."""
    with open_gated(tmp_path / "home", gate_mode) as service:
        yield service


def new_hot_key(gated: Gated, custody: str) -> dict[str, Any]:
    """A new key labelled ``hot`` in ``custody``, created by alice through the API."""
    response = gated.signed(
        "POST", "/v1/keys", {"chain": "ethereum", "custody": custody, "labels": ["hot"]}
    )
    assert response.status_code == 201, response.text
    key: dict[str, Any] = response.json()["keys"][0]
    return key


@pytest.fixture
def hot_key(gated: Gated, gate_mode: str) -> dict[str, Any]:
    """A key labelled ``hot``: sealed by the enclave with the enclave's gate, else in the
    keystore."""
    return new_hot_key(gated, "enclave" if gate_mode == "enclave" else "keystore")


def transaction(
    *,
    chain_id: int = 1,
    to: str | None = RECIPIENT,
    value: int = 10**15,
    data: str = "0x",
    nonce: int = 0,
    gas: int = 100_000,
    max_fee_per_gas: int = 30 * 10**9,
) -> dict[str, Any]:
    tx: dict[str, Any] = {
        "type": "0x2",
        "chainId": hex(chain_id),
        "nonce": hex(nonce),
        "value": hex(value),
        "gas": hex(gas),
        "maxFeePerGas": hex(max_fee_per_gas),
        "maxPriorityFeePerGas": hex(min(10**9, max_fee_per_gas)),
        "data": data,
    }
    if to is not None:
        tx["to"] = to
    return tx


@contextmanager
def first_fsync_failing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Within, the first ``os.fsync`` fails (EIO) and the later ones work: an audit write's
    fsync fails, undoing it succeeds. Afterwards ``os.fsync`` is itself again."""
    real_fsync = os.fsync
    calls = itertools.count()

    def failing(fd: int) -> None:
        if next(calls) == 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)
    try:
        yield
    finally:
        monkeypatch.setattr(os, "fsync", real_fsync)
