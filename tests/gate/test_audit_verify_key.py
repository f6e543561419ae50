"""AUDIT_VERIFY with the audit key's ciphertext: the enclave unwraps it for verification
only. The gate's clients, policy and chain stay as they are; the log is compared with the
chain head only when the key is the one the gate seals with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cbor2
import pytest

from signd.audit import AuditSigner
from signd.crypto.secret import Secret
from signd.enclave.gate import (
    AUDIT_KEY_CONTEXT,
    UNCONFIGURED,
    VERIFY_KEY_AGE,
    VERIFY_KEYS_KEPT,
    EnclaveGate,
)
from signd.enclave.signer import EnclaveSigner
from signd.errors import ConfigurationError, DependencyUnavailable, IntegrityError
from tests.enclave.fakes import MemoryBlobStore, MemoryKms
from tests.gate.support import BROAD_CLIENTS, BROAD_POLICY, POLICY


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def kms() -> MemoryKms:
    return MemoryKms()


@pytest.fixture
def make_gate(kms: MemoryKms, clock: Clock) -> Callable[[], EnclaveGate]:
    def make() -> EnclaveGate:
        return EnclaveGate(EnclaveSigner(kms, MemoryBlobStore()), kms, now=clock)

    return make


def sealed_key(kms: MemoryKms) -> tuple[bytes, Secret]:
    """A new audit key's ciphertext, and the key (as the test's own reference)."""
    data_key = kms.generate_data_key(encryption_context=AUDIT_KEY_CONTEXT)
    return data_key.ciphertext, data_key.plaintext


def log_lines(mac_key: Secret, count: int, clock: Clock) -> list[str]:
    signer = AuditSigner(mac_key, "node-a", now=clock)
    return [
        signer.seal(operation="sign:hash", decision="refused", reason=f"record {n}").to_json()
        for n in range(count)
    ]


def verify(
    gate: EnclaveGate, lines: list[str], audit_key: bytes | None, chunk: int = 2
) -> dict[str, Any]:
    """The host's side of AUDIT_VERIFY, ``chunk`` lines at a time; the last answer."""
    state, answer = b"", {}
    for start in range(0, len(lines), chunk):
        body: dict[str, Any] = {
            "records": lines[start : start + chunk],
            "state": state,
            "final": start + chunk >= len(lines),
        }
        if audit_key is not None:
            body["audit_key"] = audit_key
        answer = gate.audit_verify(body)
        assert "against_chain_head" in answer
        state = answer["state"]
        if "problem" in answer:
            break
    return answer


def configure(gate: EnclaveGate, audit_key: bytes, head: str, policy: str = POLICY) -> None:
    gate.configure(
        {
            "clients": BROAD_CLIENTS.encode(),
            "policy": policy.encode(),
            "audit_key": audit_key,
            "audit_head": head.encode(),
        }
    )


def test_an_unconfigured_gate_verifies_and_stays_unconfigured(
    make_gate: Callable[[], EnclaveGate], kms: MemoryKms, clock: Clock
) -> None:
    ciphertext, mac_key = sealed_key(kms)
    lines = log_lines(mac_key, 7, clock)
    gate = make_gate()
    before = kms.decrypted
    answer = verify(gate, lines, ciphertext)
    assert "problem" not in answer and answer["checked"] == 7
    assert answer["against_chain_head"] is False
    assert kms.decrypted == before + 1  # one unwrap for all four chunks
    assert gate.attestation_user_data() is None
    with pytest.raises(ConfigurationError, match="not configured"):
        gate.gate({"request": {}})
    # nor did it take the key as its own: a GATE_CONFIGURE with another one is its first
    other, other_key = sealed_key(kms)
    configure(gate, other, log_lines(other_key, 1, clock)[0])
    assert gate.attestation_user_data() is not None


def test_the_gates_own_key_checks_truncation_and_needs_no_kms(
    make_gate: Callable[[], EnclaveGate], kms: MemoryKms, clock: Clock
) -> None:
    ciphertext, mac_key = sealed_key(kms)
    lines = log_lines(mac_key, 5, clock)
    gate = make_gate()
    configure(gate, ciphertext, lines[-1])
    in_force = gate.attestation_user_data()
    before = kms.decrypted
    answer = verify(gate, lines, ciphertext)
    assert "problem" not in answer and answer["against_chain_head"] is True
    cut = verify(gate, lines[:-1], ciphertext)
    assert cut["problem"]["kind"] == "truncated", cut
    assert cut["against_chain_head"] is True
    assert kms.decrypted == before
    assert gate.attestation_user_data() == in_force


def test_another_key_verifies_its_own_log_only_and_changes_nothing(
    make_gate: Callable[[], EnclaveGate], kms: MemoryKms, clock: Clock
) -> None:
    own, own_key = sealed_key(kms)
    other, other_key = sealed_key(kms)
    own_lines, other_lines = log_lines(own_key, 3, clock), log_lines(other_key, 4, clock)
    gate = make_gate()
    configure(gate, own, own_lines[-1])
    in_force = gate.attestation_user_data()

    answer = verify(gate, other_lines[:-1], other)  # cut short: nothing to compare it with
    assert "problem" not in answer and answer["against_chain_head"] is False
    assert verify(gate, own_lines, other)["problem"]["kind"] == "altered"
    assert verify(gate, other_lines, own)["problem"]["kind"] == "altered"
    assert gate.attestation_user_data() == in_force
    # the gate's chain goes on from its own head, with its own key
    with pytest.raises(ConfigurationError, match="keeps another audit key"):
        configure(gate, other, other_lines[-1])
    configure(gate, own, own_lines[-1], policy=BROAD_POLICY)  # a reload still works


def test_a_key_the_enclave_cannot_unwrap_is_refused(
    make_gate: Callable[[], EnclaveGate], kms: MemoryKms, clock: Clock
) -> None:
    foreign_kms = MemoryKms()
    foreign, foreign_key = sealed_key(foreign_kms)
    lines = log_lines(foreign_key, 2, clock)
    wrong_context = kms.generate_data_key(encryption_context={"purpose": "sealed-key"})
    gate = make_gate()
    for ciphertext in (foreign, wrong_context.ciphertext, b"\x00" * 60):
        with pytest.raises(IntegrityError):
            verify(gate, lines, ciphertext)
    short = kms.decrypt  # a KMS that unwraps to something that is no data key

    def short_key(ciphertext: bytes, **options: Any) -> Secret:
        return Secret(short(ciphertext, **options).reveal_bytes()[:16])

    kms.decrypt = short_key  # type: ignore[method-assign]
    ciphertext, _ = sealed_key(kms)
    with pytest.raises(IntegrityError, match="not a KMS data key"):
        verify(gate, lines, ciphertext)
    with pytest.raises(ConfigurationError) as unconfigured:
        verify(gate, lines, None)  # no key sent: the gate's, which it has not
    assert unconfigured.value.message == UNCONFIGURED


def test_kms_down_is_a_dependency_fault_that_recovers(
    make_gate: Callable[[], EnclaveGate], kms: MemoryKms, clock: Clock
) -> None:
    ciphertext, mac_key = sealed_key(kms)
    lines = log_lines(mac_key, 3, clock)
    gate = make_gate()
    kms.down = True
    with pytest.raises(DependencyUnavailable):
        verify(gate, lines, ciphertext)
    kms.down = False
    assert "problem" not in verify(gate, lines, ciphertext)


def test_unwrapped_keys_are_kept_by_ciphertext_for_a_while_and_a_few_only(
    make_gate: Callable[[], EnclaveGate], kms: MemoryKms, clock: Clock
) -> None:
    gate = make_gate()
    keys = [sealed_key(kms) for _ in range(VERIFY_KEYS_KEPT + 1)]
    logs = [log_lines(mac_key, 2, clock) for _, mac_key in keys]
    first = keys[0][0]
    before = kms.decrypted
    verify(gate, logs[0], first)
    verify(gate, logs[0], first)
    assert kms.decrypted == before + 1
    clock.now += VERIFY_KEY_AGE
    verify(gate, logs[0], first)  # too old: unwrapped again
    assert kms.decrypted == before + 2
    for (ciphertext, _), lines in zip(keys[1:], logs[1:], strict=True):
        verify(gate, lines, ciphertext)
    assert kms.decrypted == before + 2 + VERIFY_KEYS_KEPT
    verify(gate, logs[0], first)  # the least recently used one was dropped
    assert kms.decrypted == before + 3 + VERIFY_KEYS_KEPT


def test_answers_carry_no_key(
    make_gate: Callable[[], EnclaveGate], kms: MemoryKms, clock: Clock
) -> None:
    ciphertext, mac_key = sealed_key(kms)
    lines = log_lines(mac_key, 3, clock)
    gate = make_gate()
    good = verify(gate, lines, ciphertext, chunk=3)
    bad = verify(gate, [lines[0], lines[2]], ciphertext, chunk=3)
    assert bad["problem"]["kind"] == "removed"
    for answer in (good, bad):
        encoded = cbor2.dumps(answer)
        assert mac_key.reveal_bytes() not in encoded
        assert mac_key.reveal_bytes().hex().encode() not in encoded
