"""Where the gate's files live, and the development defaults ``signd serve`` writes on first
run: a client key pair, a clients file and a policy.

Files under the signd home unless configured (``[api] clients_file``, ``policy_file``,
``audit_log``):

| file | what |
|---|---|
| ``clients.toml`` | registered clients (``signd.auth``) |
| ``policy.toml`` | the signing policy (``signd.policy``) |
| ``audit.log`` | the sealed audit records, one JSON line each |
| ``audit.key`` | the audit MAC key (hex, 0600), created on first run (in-process gate) |
| ``audit.key.sealed`` | the audit MAC key as KMS ciphertext (enclave gate; 0600) |
| ``dev-client.key`` | the development client's Ed25519 private key (PEM, 0600) |

With the enclave's gate (:mod:`signd.enclave.gate`) the MAC key is a KMS data key that only
the enclave unwraps; the host keeps its ciphertext. With the in-process gate the service
process holds it in ``audit.key``, and ``signd audit verify`` reads the same file.
"""

from __future__ import annotations

import base64
import logging
import math
import secrets
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from signd import files
from signd.audit import FileAuditLog
from signd.audit.records import MIN_MAC_KEY_BYTES, ChainHead
from signd.audit.tail import check_tail, reaches, read_tail, spends
from signd.auth import SCOPES, ClientsHolder, RequestVerifier
from signd.crypto.secret import Secret
from signd.errors import ConfigurationError, IntegrityError
from signd.gate.audit import AuditTrail
from signd.gate.interpret import DEFAULT_LIMITS, Limits
from signd.gate.keeper import GateCustody, Gatekeeper
from signd.policy import PolicyEngine, PolicyHolder

log = logging.getLogger("signd.gate")

CLIENTS_FILE: Final = "clients.toml"
POLICY_FILE: Final = "policy.toml"
AUDIT_LOG: Final = "audit.log"
AUDIT_KEY_FILE: Final = "audit.key"
SEALED_AUDIT_KEY_FILE: Final = "audit.key.sealed"
DEV_CLIENT_ID: Final = "dev"
DEV_CLIENT_KEY: Final = "dev-client.key"
DEV_CHAIN_IDS: Final = (1, 11155111, 31337)
PRIVATE: Final = 0o600


@dataclass(frozen=True, slots=True)
class GatePaths:
    clients_file: Path
    policy_file: Path
    audit_log: Path
    audit_key_file: Path
    sealed_audit_key_file: Path

    @classmethod
    def under(
        cls,
        home: Path,
        *,
        clients_file: str | Path | None = None,
        policy_file: str | Path | None = None,
        audit_log: str | Path | None = None,
    ) -> GatePaths:
        """The configured paths (``{home}`` expanded), else the defaults under ``home``."""

        def path(value: str | Path | None, default: str) -> Path:
            if value is None:
                return home / default
            return Path(str(value).replace("{home}", str(home))).expanduser()

        return cls(
            path(clients_file, CLIENTS_FILE),
            path(policy_file, POLICY_FILE),
            path(audit_log, AUDIT_LOG),
            home / AUDIT_KEY_FILE,
            home / SEALED_AUDIT_KEY_FILE,
        )


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` holding ``data``, readable by its owner only, atomically and durably.

    ``data`` goes to a temporary file in the same folder, synced, then linked to ``path``: a
    crash leaves no file or the whole one, never a part of it. An existing ``path`` is never
    overwritten (a ConfigurationError), except an empty file, which is what a crash left
    behind while an older signd wrote it.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not files.write_new(path, data, PRIVATE):
            if not _is_empty_file(path):
                raise ConfigurationError(f"{path} exists already, and signd never overwrites it")
            files.replace(path, data, PRIVATE)
    except OSError as exc:
        raise ConfigurationError(f"cannot write {path}: {exc.strerror}") from None


def _is_empty_file(path: Path) -> bool:
    """Whether ``path`` is a regular file (not a link to one) of no bytes."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size == 0


def load_mac_key(path: Path, *, create: bool = False) -> Secret:
    """The audit MAC key (hex in ``path``); with ``create``, 32 fresh bytes when it is missing
    or empty."""
    if create and (not path.exists() or _is_empty_file(path)):
        write_private(path, secrets.token_bytes(32).hex().encode() + b"\n")
        log.warning("created the audit MAC key %s (keep it: audit verify needs it)", path)
    try:
        text = path.read_text().strip()
        key = bytes.fromhex(text)
    except OSError as exc:
        raise ConfigurationError(f"cannot read the audit MAC key {path}: {exc.strerror}") from None
    except ValueError:
        raise ConfigurationError(f"the audit MAC key {path} is not hex") from None
    if not key:
        raise ConfigurationError(f"the audit MAC key {path} is empty: restore the key file")
    if len(key) < MIN_MAC_KEY_BYTES:
        raise ConfigurationError(f"the audit MAC key {path} is shorter than 32 bytes")
    if path.stat().st_mode & 0o077:
        log.warning("the audit MAC key %s is readable by others; chmod 600 it", path)
    return Secret(key)


@dataclass(frozen=True, slots=True)
class DevDefaults:
    """What :func:`write_dev_defaults` created."""

    client_id: str
    private_key: Path
    clients_file: Path
    policy_file: Path


def dev_policy(client_id: str = DEV_CLIENT_ID) -> str:
    chain_ids = ", ".join(str(c) for c in DEV_CHAIN_IDS)
    domains = "".join(
        f"\n[[rules.eip712_domains]]\nchainId = {chain_id}\n" for chain_id in DEV_CHAIN_IDS
    )
    return f"""\
# DEVELOPMENT POLICY written by `signd serve` on first run. DO NOT USE IN PRODUCTION.
# It lets the development client {client_id!r} do everything on chain ids {chain_ids},
# and BLIND SIGNING (raw 32-byte hashes) IS ON for that client (rule dev-blind).
# Replace this file with your own policy (docs/POLICY.md), then `kill -HUP` signd.
version = 1

[[rules]]
name = "dev-keys"
clients = ["{client_id}"]
key_labels = ["*"]
operations = ["keys:create"]
chains = ["ethereum"]

[[rules]]
name = "dev-transactions"
clients = ["{client_id}"]
key_labels = ["*"]
operations = ["sign:transaction"]
chains = ["ethereum"]
chain_ids = [{chain_ids}]
allow_contract_creation = true
contract_selectors = ["*"]

[[rules]]
name = "dev-messages"
clients = ["{client_id}"]
key_labels = ["*"]
operations = ["sign:message"]
chains = ["ethereum"]

[[rules]]
name = "dev-typed-data"
clients = ["{client_id}"]
key_labels = ["*"]
operations = ["sign:typed_data"]
chains = ["ethereum"]
chain_ids = [{chain_ids}]
{domains}
[[rules]]
name = "dev-blind"
clients = ["{client_id}"]
key_labels = ["*"]
operations = ["sign:hash"]
chains = ["ethereum"]
blind_signing = true
"""


def ed25519_public_key_text(key: ed25519.Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + base64.b64encode(raw).decode("ascii")


def write_dev_defaults(home: Path, paths: GatePaths) -> DevDefaults | None:
    """On first run (neither file exists), a development client and policy; else ``None``.

    One file without the other is a :class:`~signd.errors.ConfigurationError`: signd never
    guesses half of its access control.
    """
    have_clients, have_policy = paths.clients_file.exists(), paths.policy_file.exists()
    if have_clients and have_policy:
        return None
    if have_clients or have_policy:
        missing = paths.policy_file if have_clients else paths.clients_file
        raise ConfigurationError(f"{missing} is missing (the clients and policy files go together)")
    key = ed25519.Ed25519PrivateKey.generate()
    key_path = home / DEV_CLIENT_KEY
    write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    scopes = ", ".join(f'"{scope}"' for scope in sorted(SCOPES))
    clients = f"""\
# DEVELOPMENT CLIENT written by `signd serve` on first run: every scope, every key.
# Its private key is {key_path} (0600). Register your own clients (docs/POLICY.md).
version = 1

[[clients]]
id = "{DEV_CLIENT_ID}"
scopes = [{scopes}]
key_labels = ["*"]
public_key = "{ed25519_public_key_text(key)}"
"""
    paths.clients_file.parent.mkdir(parents=True, exist_ok=True)
    paths.clients_file.write_text(clients)
    paths.policy_file.parent.mkdir(parents=True, exist_ok=True)
    paths.policy_file.write_text(dev_policy())
    return DevDefaults(DEV_CLIENT_ID, key_path, paths.clients_file, paths.policy_file)


def open_audit_log(path: Path) -> FileAuditLog:
    """The audit log at ``path``, for either gate; its folder is made if missing (with a
    warning: a folder that should be a mounted volume would now be one on this disk). A
    folder or file that cannot be made or opened is a ConfigurationError naming it."""
    folder = path.parent
    try:
        if not folder.is_dir():
            folder.mkdir(parents=True, mode=0o700)
            log.warning(
                "made the folder %s for the audit log: if the log belongs on a volume of its "
                "own, that volume is not mounted",
                folder,
            )
        return FileAuditLog(path)
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise ConfigurationError(f"cannot open the audit log {path}: {why}") from None


def open_gatekeeper(
    signer: GateCustody,
    paths: GatePaths,
    *,
    node: str | None = None,
    now: Callable[[], float] = time.time,
    limits: Limits = DEFAULT_LIMITS,
) -> Gatekeeper:
    """The gatekeeper over ``signer`` with the clients, policy and audit files of ``paths``
    (the MAC key is created on first run), its spend windows rebuilt from the audit log's
    tail. Logs each file's SHA-256. ``now`` is the clock of the policy's spend windows."""
    clients = ClientsHolder.load(paths.clients_file)
    policy = PolicyHolder.load(paths.policy_file)
    mac_key = load_mac_key(paths.audit_key_file, create=not paths.audit_log.exists())
    store = open_audit_log(paths.audit_log)
    engine = PolicyEngine(policy, now=now)
    try:
        trail = AuditTrail(mac_key, node or socket.gethostname(), store)
        replayed = replay_audit_tail(engine, mac_key, paths.audit_log, trail.signer.head, now=now())
    except Exception:
        store.close()
        raise
    log.info(
        "gate: clients %s (sha256 %s), policy %s (sha256 %s), audit log %s from seq %d",
        paths.clients_file,
        clients.sha256,
        paths.policy_file,
        policy.sha256,
        paths.audit_log,
        trail.signer.head.seq,
    )
    log.info("gate: %d spends replayed into the policy's windows", replayed)
    # Request timestamps are whole seconds: refuse those signed before this second (a
    # restarted process has forgotten the nonces seen before it), not before this instant.
    return Gatekeeper(
        signer,
        RequestVerifier(
            clients,
            not_before=math.floor(time.time()),
            nonce_capacity=limits.nonce_capacity,
            nonce_quota=limits.nonce_quota,
        ),
        engine,
        trail,
        clients=clients,
        policy=policy,
        limits=limits,
    )


def replay_audit_tail(
    engine: PolicyEngine, mac_key: Secret, path: Path, head: ChainHead, *, now: float
) -> int:
    """Rebuild ``engine``'s spend windows from the audit log at ``path``, whose last record
    is ``head``: the records over the policy's longest window are read back, checked
    (MACs, links, ending at ``head``) and their spends replayed. A tail that does not verify
    is an :class:`~signd.errors.IntegrityError`: nothing is signed over windows that may be
    short. The number of spends replayed."""
    window = engine.longest_window
    if window == 0 or head.seq == 0:
        return 0
    since = now - window
    tail = read_tail(path, since=since)
    check_tail(tail, mac_key, ends_at=head.hash)
    if not reaches(tail[0], since):
        raise IntegrityError(f"audit log {path} does not reach back over the spend windows")
    found = spends(tail)
    engine.replay(found)
    return len(found)
