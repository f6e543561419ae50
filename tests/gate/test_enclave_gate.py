"""The gate in a real enclave process (``signd enclave`` over a Unix socket): what an honest
host gets, and what a compromised host cannot do.

The malicious-host tests talk to the enclave client directly, as a host that has been taken
over would: they change the body, swap the calls, relabel a key, replay a request, and drop
or edit audit records, and each is caught by the enclave.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest

from signd.api import ApiSettings, create_app
from signd.api.enclave_gatekeeper import EnclaveGatekeeper, verify_in_enclave
from signd.api.gatekeeping import GatekeeperGate, gatekeeper_authenticator
from signd.attestation.document import AttestationDocument, CoseSign1
from signd.audit import SealedAuditRecord
from signd.audit.lines import LogLines
from signd.auth import sign_request
from signd.client import key_from_dict
from signd.custody.base import KeyInfo
from signd.custody.enclave import EnclaveBackend
from signd.enclave.client import EnclaveClient
from signd.enclave.gate import MAX_LINE_SIZE
from signd.enclave.protocol import KeyReference, MessageType
from signd.enclave.transport import UnixTransport
from signd.errors import (
    AccessDenied,
    ConfigurationError,
    DependencyUnavailable,
    IntegrityError,
    InvalidRequest,
)
from signd.gate import GateRequest, SigningCall, SigningKind
from signd.gate.intents import prepare
from signd.operations import Signer
from tests.api import samples
from tests.gate.support import (
    OTHER,
    Gated,
    gated_files,
    make_home,
    open_signer,
    transaction,
)

pytestmark = pytest.mark.integration

SIGN_TX = "/v1/sign/ethereum/transaction"
STARTUP = 30.0


@dataclass
class Enclave:
    """A ``signd enclave`` process, the host's gatekeeper over it, and the gated app."""

    gated: Gated
    gatekeeper: EnclaveGatekeeper
    client: EnclaveClient
    home: Path
    address: str
    process: subprocess.Popen[bytes]

    def request(
        self, method: str, path: str, body: Any, *, as_client: str = "alice"
    ) -> GateRequest:
        """A request as a client signed it, as it reaches the host."""
        content = json.dumps(body).encode()
        key = self.gated.alice if as_client == "alice" else self.gated.reader
        headers = sign_request(method, path, content, as_client, key)
        return GateRequest(method, path, content, headers)

    def gate(self, request: GateRequest, **fields: Any) -> dict[str, Any]:
        """One GATE exactly as a (possibly malicious) host would send it; its audit records
        are appended to the log."""
        body = {
            "request": {
                "method": request.method,
                "target": request.path,
                "body": request.body,
                "headers": dict(request.headers),
            },
            "keys": fields.pop("keys", []),
            "fills": fields.pop("fills", {}),
            **fields,
        }
        answer = self.client.request(MessageType.GATE, body)
        records = [SealedAuditRecord.from_json(line) for line in answer["audit"]]
        self.gatekeeper.audit.append_many(records)  # this host keeps its log
        return answer

    def describe(self, ref: str, info: KeyInfo, **changes: Any) -> dict[str, Any]:
        """A key description as the host sends it (``changes`` to lie about it)."""
        description = self.gatekeeper._describe(ref, info)
        return description | changes


def wait_for_enclave(address: str, process: subprocess.Popen[bytes], log: Path) -> None:
    client = EnclaveClient(UnixTransport(address.removeprefix("unix://")), connect_timeout=0.5)
    deadline = time.monotonic() + STARTUP
    try:
        while True:
            try:
                client.health()
                return
            except DependencyUnavailable:
                if process.poll() is not None:
                    raise RuntimeError(f"the enclave exited:\n{log.read_text()}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the enclave did not start:\n{log.read_text()}") from None
                time.sleep(0.05)
    finally:
        client.close()


def start_enclave_process(home: Path, address: str, *options: str) -> subprocess.Popen[bytes]:
    """``signd enclave --listen ADDRESS --gate-only OPTIONS``: as ``signd serve`` starts it."""
    log = home / "enclave.log"
    command = ["enclave", "--listen", address, "--gate-only", *options]
    with log.open("ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "signd", "--home", str(home), *command],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            env={**os.environ, "SIGND_HOME": str(home)},
        )
    wait_for_enclave(address, process, log)
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def enclave(tmp_path: Path) -> Iterator[Enclave]:
    from starlette.testclient import TestClient

    with ExitStack() as stack:
        sockets = Path(tempfile.mkdtemp(prefix="signd-eg-"))
        stack.callback(shutil.rmtree, sockets, ignore_errors=True)
        address = f"unix://{sockets}/enclave.sock"
        home = make_home(tmp_path / "home", address)
        paths, alice, reader = gated_files(home)
        process = start_enclave_process(home, address)
        signer: Signer = stack.enter_context(open_signer(home))
        backend = signer.backend("enclave")
        assert isinstance(backend, EnclaveBackend)
        gatekeeper = EnclaveGatekeeper(backend.client, signer, paths, node="test-node")
        stack.callback(gatekeeper.close)
        gatekeeper.configure()
        settings = ApiSettings(allow_blind_signing=True)
        app = create_app(
            signer,
            settings,
            authenticate=gatekeeper_authenticator(gatekeeper, settings),
            gate=GatekeeperGate(gatekeeper),
        )
        client = stack.enter_context(TestClient(app))
        gated = Gated(client, gatekeeper, paths, signer, alice, reader)
        running = Enclave(gated, gatekeeper, backend.client, home, address, process)
        stack.callback(lambda: stop(running.process))
        yield running


def new_key(enclave: Enclave, labels: list[str], custody: str = "enclave") -> dict[str, Any]:
    response = enclave.gated.signed(
        "POST", "/v1/keys", {"chain": "ethereum", "custody": custody, "labels": labels}
    )
    assert response.status_code == 201, response.text
    key: dict[str, Any] = response.json()["keys"][0]
    return key


def tx_body(key: dict[str, Any], **options: Any) -> dict[str, Any]:
    return {"key": key["address"], "transaction": transaction(**options)}


def sealed(lines: list[str]) -> list[dict[str, Any]]:
    return [asdict(SealedAuditRecord.from_json(line).record) for line in lines]


def test_signed_requests_pass_and_refusals_are_audited_as_refused(enclave: Enclave) -> None:
    gated = enclave.gated
    hot = new_key(enclave, ["hot"])
    signed = gated.signed("POST", SIGN_TX, tx_body(hot))
    assert signed.status_code == 200, signed.text
    raw = signed.json()["raw_transaction"]
    assert samples.transaction_signer(raw) == hot["address"]
    record = gated.last()
    assert (record["decision"], record["rule"], record["key_id"]) == (
        "allowed",
        "hot-eth",
        hot["key_id"],
    )
    assert record["result_sha256"] == hashlib.sha256(bytes.fromhex(raw[2:])).hexdigest()

    items = [
        {"type": "ethereum/transaction", **tx_body(hot, nonce=1)},
        {"type": "ethereum/transaction", **tx_body(hot, chain_id=5)},
        {"type": "ethereum/message", "key": hot["address"], "message": "m"},
    ]
    before = len(gated.records())
    batch = gated.signed("POST", "/v1/sign/batch", {"requests": items}).json()["results"]
    assert "raw_transaction" in batch[0] and "signature" in batch[2]
    assert batch[1]["error"]["rule"] == "hot-eth"
    assert [r.record.decision for r in gated.records()[before:]] == [
        "allowed",
        "refused",
        "allowed",
    ]

    unsigned = gated.client.post(SIGN_TX, json=tx_body(hot))
    assert unsigned.status_code == 401
    assert (gated.last()["operation"], gated.last()["decision"]) == ("authenticate", "refused")
    assert not enclave.gatekeeper.paths.audit_key_file.exists()  # no MAC key on the host
    lines = enclave.gatekeeper.paths.audit_log.read_bytes().splitlines()
    found = verify_in_enclave(enclave.client, enclave.gatekeeper.paths, lines)
    assert found.problem is None and found.records == len(lines)


def test_a_body_changed_by_the_host_is_not_authenticated(enclave: Enclave) -> None:
    hot = new_key(enclave, ["hot"])
    request = enclave.request("POST", SIGN_TX, tx_body(hot))
    changed = GateRequest(
        request.method, request.path, request.body.replace(b"0x3535", b"0x5aAe"), request.headers
    )
    info = enclave.gated.signer.get_key(hot["address"])
    answer = enclave.gate(changed, select=[0], keys=[enclave.describe(hot["address"], info)])
    assert answer["error"]["code"] == "unauthenticated"
    assert "does not verify" in answer["error"]["message"]
    assert answer["outcomes"] == []
    [record] = sealed(answer["audit"])
    assert (record["operation"], record["decision"]) == ("authenticate", "refused")


def test_the_enclave_signs_what_the_body_says_not_what_the_host_parsed(
    enclave: Enclave,
) -> None:
    hot = new_key(enclave, ["hot"])
    info = enclave.gated.signer.get_key(hot["address"])
    keys = [enclave.describe(hot["address"], info)]

    # through the host's own gatekeeper: a swapped call matches nothing and is not sent
    request = enclave.request("POST", SIGN_TX, tx_body(hot))
    caller = enclave.gatekeeper.authenticate(request)
    swapped = SigningCall(SigningKind.ETH_TRANSACTION, hot["address"], transaction(to=OTHER))
    [outcome] = enclave.gatekeeper.sign(caller, [swapped])
    assert isinstance(outcome, Exception) and "not one the authenticated" in str(outcome)

    # a request the enclave cannot read: the call is refused with the enclave's reason
    unread = enclave.request("POST", SIGN_TX + "?a=b", tx_body(hot))
    caller = enclave.gatekeeper.authenticate(unread)
    call = SigningCall(SigningKind.ETH_TRANSACTION, hot["address"], transaction())
    [outcome] = enclave.gatekeeper.sign(caller, [call])
    assert isinstance(outcome, InvalidRequest) and "takes no query string" in outcome.message

    # a host that fills a field the caller gave, or one it may not fill, is refused
    for fills in ({"to": OTHER}, {"nonce": "0x9"}):
        request = enclave.request("POST", SIGN_TX, tx_body(hot))
        answer = enclave.gate(request, select=[0], keys=keys, fills={0: fills})
        [outcome] = answer["outcomes"]
        assert outcome["error"]["code"] == "invalid_request", outcome
        [record] = sealed(answer["audit"])
        assert record["decision"] == "refused"

    # a host that describes another key under the reference the caller named
    other = enclave.gated.signer.get_key(new_key(enclave, ["hot"])["address"])
    request = enclave.request("POST", SIGN_TX, tx_body(hot))
    answer = enclave.gate(request, select=[0], keys=[enclave.describe(hot["address"], other)])
    assert answer["outcomes"][0]["error"]["code"] == "key_not_found"

    # what the enclave signs is the digest of the transaction in the body, nothing else
    request = enclave.request("POST", SIGN_TX, tx_body(hot))
    answer = enclave.gate(request, select=[0], keys=keys)
    [outcome] = answer["outcomes"]
    assert outcome["digest"] == prepare(SigningKind.ETH_TRANSACTION, transaction(), info).digest
    assert len(outcome["signature"]) == 65


def test_a_host_cannot_sign_or_make_sealed_keys_around_the_gate(enclave: Enclave) -> None:
    """The bare SIGN_DIGEST(S) and CREATE_KEYS a host could send instead of a GATE are refused
    by a gate-only enclave (as signd serve runs it): nothing is signed or made that no client
    asked for, the policy allowed and the audit log records."""
    hot = new_key(enclave, ["hot"])
    backend = enclave.gated.signer.backend("enclave")
    assert isinstance(backend, EnclaveBackend)
    reference = backend.reference(enclave.gated.signer.get_key(hot["address"]))
    assert isinstance(reference, KeyReference)
    audited = len(enclave.gated.records())
    assert enclave.client.gate_only()
    with pytest.raises(AccessDenied, match="outside its gate"):
        enclave.client.sign_digest(reference, bytes(32))
    refused = enclave.client.sign_digests([(reference, bytes(32)), (reference, bytes([1]) * 32)])
    assert all(isinstance(result, AccessDenied) for result in refused)
    with pytest.raises(AccessDenied, match="outside its gate"):
        enclave.client.create_keys("ethereum", 1, ["hot"])
    assert len(enclave.gated.records()) == audited
    # through the gate, what the policy allows is still signed
    signed = enclave.gated.signed("POST", SIGN_TX, tx_body(hot))
    assert signed.status_code == 200, signed.text
    assert samples.transaction_signer(signed.json()["raw_transaction"]) == hot["address"]


def made_by_an_operator(enclave: Enclave, labels: list[str]) -> KeyInfo:
    """A sealed key made with ``signd keys new`` on the host, whose own local enclave (not
    gate-only, no client) seals it with the same KMS and store: no client here may make it."""
    env = {**os.environ, "SIGND_ENCLAVE_TRANSPORT": "", "SIGND_HOME": str(enclave.home)}
    command = [sys.executable, "-m", "signd", "keys", "new", "--custody", "enclave", "--json"]
    for label in labels:
        command += ["--label", label]
    made = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert made.returncode == 0, made.stdout + made.stderr
    return key_from_dict(json.loads(made.stdout)["keys"][0])


def test_a_key_relabelled_by_the_host_is_refused(enclave: Enclave) -> None:
    cold = made_by_an_operator(enclave, ["cold"])
    body = tx_body({"address": cold.address})
    honest = enclave.gate(
        enclave.request("POST", SIGN_TX, body),
        select=[0],
        keys=[enclave.describe(cold.address, cold)],
    )
    assert honest["outcomes"][0]["error"]["code"] == "out_of_scope"

    relabelled = enclave.gate(
        enclave.request("POST", SIGN_TX, body),
        select=[0],
        keys=[enclave.describe(cold.address, cold, labels=["hot"])],
    )
    [outcome] = relabelled["outcomes"]
    assert outcome["error"]["code"] == "integrity_error"
    assert "signature" not in outcome
    [record] = sealed(relabelled["audit"])
    assert (record["decision"], record["key_id"]) == ("refused", cold.key_id)

    # over HTTP, with the host's key records themselves rewritten, the same
    with sqlite3.connect(enclave.home / "metadata.db") as database:
        database.execute("UPDATE key_records SET labels = replace(labels, 'cold', 'hot')")
        database.execute("UPDATE key_labels SET label = 'hot' WHERE label = 'cold'")
    assert enclave.gated.signer.get_key(cold.address).labels == ("hot",)
    response = enclave.gated.signed("POST", SIGN_TX, body)
    assert response.status_code == 500, response.text
    assert response.json()["error"]["code"] == "integrity_error"
    assert (enclave.gated.last()["decision"], enclave.gated.last()["key_id"]) == (
        "refused",
        cold.key_id,
    )


def test_a_replayed_request_is_refused_and_audited(enclave: Enclave) -> None:
    hot = new_key(enclave, ["hot"])
    info = enclave.gated.signer.get_key(hot["address"])
    keys = [enclave.describe(hot["address"], info)]
    request = enclave.request("POST", SIGN_TX, tx_body(hot))
    first = enclave.gate(request, select=[0], keys=keys)
    assert "signature" in first["outcomes"][0]
    again = enclave.gate(request, select=[0], keys=keys)
    assert again["error"]["code"] == "unauthenticated"
    assert "replayed" in again["error"]["message"]
    [record] = sealed(again["audit"])
    assert (record["operation"], record["decision"]) == ("authenticate", "refused")

    # a JSON-RPC batch is shown one item at a time; each item is performed once
    calls = [
        {"jsonrpc": "2.0", "id": n, "method": "personal_sign", "params": ["0x6869", hot["address"]]}
        for n in range(2)
    ]
    batch = enclave.request("POST", "/rpc", calls)
    assert "signature" in enclave.gate(batch, select=[0], keys=keys)["outcomes"][0]
    assert "signature" in enclave.gate(batch, select=[1], keys=keys)["outcomes"][0]
    assert "replayed" in enclave.gate(batch, select=[1], keys=keys)["error"]["message"]


def test_a_request_with_a_call_never_performed_is_not_authenticated_twice(
    enclave: Enclave,
) -> None:
    """Presented again to authenticate (not to perform one of its calls), a request is a
    replay, even when one of its calls can never be performed (here, bad parameters that
    the host refuses), so what the host does on authentication alone is not done twice."""
    hot = new_key(enclave, ["hot"])
    calls = [
        {"jsonrpc": "2.0", "id": 1, "method": "eth_accounts", "params": []},
        {"jsonrpc": "2.0", "id": 2, "method": "personal_sign", "params": ["zz", hot["address"]]},
    ]
    batch = enclave.request("POST", "/rpc", calls)
    assert "error" not in enclave.gate(batch)
    again = enclave.gate(batch)
    assert again["error"]["code"] == "unauthenticated"
    assert "replayed" in again["error"]["message"]
    [record] = sealed(again["audit"])
    assert (record["operation"], record["decision"]) == ("authenticate", "refused")

    # over HTTP, the same bytes and headers a second time
    content = json.dumps(calls).encode()
    headers = {**sign_request("POST", "/rpc", content, "alice", enclave.gated.alice)}
    headers["content-type"] = "application/json"
    first = enclave.gated.client.post("/rpc", content=content, headers=headers)
    replayed = enclave.gated.client.post("/rpc", content=content, headers=headers)
    assert first.status_code == 200 and "result" in first.json()[0], first.text
    assert "replayed" in replayed.text and "result" not in replayed.text, replayed.text


def test_dropped_or_edited_audit_records_are_caught(enclave: Enclave) -> None:
    hot = new_key(enclave, ["hot"])
    for nonce in range(4):
        enclave.gated.signed("POST", SIGN_TX, tx_body(hot, nonce=nonce))
    paths = enclave.gatekeeper.paths
    lines = paths.audit_log.read_bytes().splitlines()
    assert len(lines) >= 5

    def verify(candidate: list[bytes]) -> dict[str, Any] | None:
        return verify_in_enclave(enclave.client, paths, candidate).problem

    assert verify(lines) is None
    dropped = verify(lines[:2] + lines[3:])
    assert dropped is not None and dropped["kind"] == "removed" and dropped["position"] == 2
    edited = lines[:]
    edited[3] = edited[3].replace(b'"decision":"allowed"', b'"decision":"refused"')
    problem = verify(edited)
    assert problem is not None and problem["kind"] == "altered" and problem["position"] == 3
    truncated = verify(lines[:-1])
    assert truncated is not None and truncated["kind"] == "truncated"
    oversized = lines[:]  # over the channel's frame limit: reported at its place all the same
    oversized[2] = oversized[2].replace(b'"reason":"', b'"reason":"' + b"x" * (2 << 20), 1)
    problem = verify(oversized)
    assert problem is not None and (problem["kind"], problem["position"]) == ("unreadable", 2)

    # the host cannot seed the chain with a record it made up
    head = json.loads(lines[-1])
    head["record"]["reason"] = "made up by the host"
    with pytest.raises(IntegrityError, match="does not verify"):
        enclave.client.request(
            MessageType.GATE_CONFIGURE,
            {
                "clients": paths.clients_file.read_bytes(),
                "policy": paths.policy_file.read_bytes(),
                "audit_key": paths.sealed_audit_key_file.read_bytes(),
                "audit_head": json.dumps(head).encode(),
                "resume": True,
            },
        )


def test_the_host_sends_the_log_from_its_file_a_chunk_at_a_time(
    enclave: Enclave, tmp_path: Path
) -> None:
    """Read through :class:`LogLines`, the log is never in the host's memory whole: a 50 MB
    line among the records is reported at its place, cut short on its way."""
    hot = new_key(enclave, ["hot"])
    for nonce in range(3):
        enclave.gated.signed("POST", SIGN_TX, tx_body(hot, nonce=nonce))
    paths = enclave.gatekeeper.paths
    lines = paths.audit_log.read_bytes().splitlines()
    with paths.audit_log.open("rb") as file:
        found = verify_in_enclave(enclave.client, paths, LogLines(file, max_size=MAX_LINE_SIZE))
    assert (found.problem, found.records) == (None, len(lines))
    grown = lines[1].replace(b'"reason":"', b'"reason":"' + b"x" * (50 << 20), 1)
    huge = tmp_path / "huge.log"
    huge.write_bytes(b"\n".join([lines[0], grown, *lines[2:]]) + b"\n")
    tracemalloc.start()
    try:
        with huge.open("rb") as file:
            found = verify_in_enclave(enclave.client, paths, LogLines(file, max_size=MAX_LINE_SIZE))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert found.problem is not None
    assert (found.problem["kind"], found.problem["position"]) == ("unreadable", 1)
    assert peak < 8 << 20, peak


def test_a_bad_policy_is_refused_and_the_old_one_stays(enclave: Enclave) -> None:
    hot = new_key(enclave, ["hot"])
    policy = enclave.gatekeeper.paths.policy_file
    good = policy.read_text()
    in_force = enclave.gatekeeper.policy_sha256
    policy.write_text("version = 1\n[[rules]]\nname = 'broken'\n")
    refusal = enclave.gatekeeper.reload()
    assert refusal is not None and refusal.files == ("policy",), refusal
    assert refusal.reason.startswith("policy: ")
    assert enclave.gatekeeper.policy_sha256 == in_force
    assert enclave.gated.signed("POST", SIGN_TX, tx_body(hot)).status_code == 200

    policy.write_text(good.replace("chain_ids = [1, 11155111]", "chain_ids = [11155111]"))
    assert enclave.gatekeeper.reload() is None
    refused = enclave.gated.signed("POST", SIGN_TX, tx_body(hot))
    assert refused.status_code == 403
    assert "chain id 1 is not in chain_ids [11155111]" in refused.json()["error"]["message"]


def test_attestation_user_data_is_the_sha256_of_the_policy_and_clients_in_force(
    enclave: Enclave,
) -> None:
    paths = enclave.gatekeeper.paths

    def user_data() -> bytes | None:
        document = enclave.client.attestation(os.urandom(16))
        return AttestationDocument.decode(CoseSign1.decode(document).payload).user_data

    def expected() -> bytes:
        return (
            hashlib.sha256(paths.policy_file.read_bytes()).digest()
            + hashlib.sha256(paths.clients_file.read_bytes()).digest()
        )

    assert user_data() == expected()
    paths.policy_file.write_text(paths.policy_file.read_text() + "\n# changed\n")
    assert enclave.gatekeeper.reload() is None
    assert user_data() == expected()


def test_verifying_the_log_puts_no_file_from_disk_in_force(enclave: Enclave) -> None:
    """A policy edited but not reloaded stays out of force through an audit verification,
    and the attested files are still the ones the host says are in force."""
    hot = new_key(enclave, ["hot"])
    paths = enclave.gatekeeper.paths
    assert enclave.gated.signed("POST", SIGN_TX, tx_body(hot, chain_id=5)).status_code == 403

    def user_data() -> bytes | None:
        document = enclave.client.attestation(os.urandom(16))
        return AttestationDocument.decode(CoseSign1.decode(document).payload).user_data

    in_force = user_data()
    assert in_force is not None and in_force.hex().startswith(enclave.gatekeeper.policy_sha256)
    good = paths.policy_file.read_text()
    paths.policy_file.write_text(good.replace("chain_ids = [1, 11155111]", "chain_ids = [1, 5]"))
    lines = paths.audit_log.read_bytes().splitlines()
    found = verify_in_enclave(enclave.client, paths, lines)
    assert (found.problem, found.records, found.against_chain_head) == (None, len(lines), True)
    assert user_data() == in_force
    assert enclave.gated.signed("POST", SIGN_TX, tx_body(hot, chain_id=5)).status_code == 403
    assert enclave.gatekeeper.reload() is None  # the edit takes effect on a reload only
    assert user_data() != in_force
    assert enclave.gated.signed("POST", SIGN_TX, tx_body(hot, chain_id=5)).status_code == 200


def test_a_restarted_enclave_is_configured_again_and_keys_still_sign(enclave: Enclave) -> None:
    hot = new_key(enclave, ["hot"])
    stop(enclave.process)
    enclave.process = start_enclave_process(enclave.home, enclave.address)
    time.sleep(1.1)  # a request signed in the second the enclave started is refused
    response = enclave.gated.signed("POST", SIGN_TX, tx_body(hot, nonce=7))
    assert response.status_code == 200, response.text
    assert samples.transaction_signer(response.json()["raw_transaction"]) == hot["address"]
    lines = enclave.gatekeeper.paths.audit_log.read_bytes().splitlines()
    found = verify_in_enclave(enclave.client, enclave.gatekeeper.paths, lines)
    assert found.problem is None and found.records == len(lines)


def test_an_emptied_sealed_audit_key_beside_records_is_a_configuration_error(
    enclave: Enclave,
) -> None:
    """The log's records need the key it held: nothing makes another one in its place."""
    new_key(enclave, ["hot"])
    sealed_key = enclave.gatekeeper.paths.sealed_audit_key_file
    sealed_key.write_bytes(b"")
    with pytest.raises(ConfigurationError, match="is missing or empty but the audit log"):
        enclave.gatekeeper.configure()
    assert sealed_key.read_bytes() == b""
