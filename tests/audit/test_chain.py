"""Sealing and verifying: every kind of tampering is found, with its position."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signd.audit import (
    GENESIS,
    GENESIS_HASH,
    AuditRecord,
    AuditSigner,
    ChainHead,
    ProblemKind,
    SealedAuditRecord,
    verify_chain,
)
from signd.audit.records import RecordMac, compute_mac
from signd.crypto.secret import Secret
from signd.errors import ConfigurationError, IntegrityError
from tests.audit.conftest import MAC_KEY, OTHER_KEY, build_chain, seal_one, ticking_clock


def altered(sealed: SealedAuditRecord, **changes: Any) -> SealedAuditRecord:
    return dataclasses.replace(sealed, record=dataclasses.replace(sealed.record, **changes))


def test_intact_chain_verifies(chain: list[SealedAuditRecord]) -> None:
    report = verify_chain(chain, MAC_KEY)
    assert report.ok, report.problems
    assert report.records == 100
    assert report.head == ChainHead(100, chain[-1].hash)
    assert [s.record.seq for s in chain] == list(range(1, 101))
    assert chain[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(chain))


def test_seal_follows_the_documented_formulas(chain: list[SealedAuditRecord]) -> None:
    sealed = chain[41]
    canonical = sealed.record.canonical()
    assert (
        canonical
        == json.dumps(  # a record leaves out the optional fields it has no value for
            {
                k: v
                for k, v in dataclasses.asdict(sealed.record).items()
                if v is not None
                or k not in ("spend", "results_sha256", "policy_sha256", "clients_sha256")
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
    )
    mac = hmac.new(MAC_KEY.reveal_bytes(), canonical + sealed.prev_hash, hashlib.sha256).digest()
    assert sealed.mac == mac
    assert sealed.hash == hashlib.sha256(sealed.prev_hash + canonical + mac).digest()


def test_record_fields(chain: list[SealedAuditRecord]) -> None:
    record = chain[0].record
    assert record.time == "2023-11-14T22:13:20.000Z"
    assert record.node == "node-a"
    assert record.decision == "refused"
    assert record.result_sha256 is None
    assert chain[1].record.decision == "allowed"


def test_empty_chain_is_fine() -> None:
    report = verify_chain([], MAC_KEY)
    assert report.ok and report.head == GENESIS


@pytest.mark.parametrize("position", [0, 1, 50, 98])
def test_removed_record_is_found(chain: list[SealedAuditRecord], position: int) -> None:
    tampered = chain[:position] + chain[position + 1 :]
    report = verify_chain(tampered, MAC_KEY)
    assert [(p.position, p.kind) for p in report.problems] == [(position, ProblemKind.REMOVED)]
    assert f"records {position + 1} are missing" in report.problems[0].detail


def test_removed_run_is_found(chain: list[SealedAuditRecord]) -> None:
    report = verify_chain(chain[:10] + chain[20:], MAC_KEY)
    assert [(p.position, p.kind, p.detail) for p in report.problems] == [
        (10, ProblemKind.REMOVED, "records 11-20 are missing")
    ]


def test_removed_tail_needs_the_expected_head(chain: list[SealedAuditRecord]) -> None:
    assert verify_chain(chain[:-3], MAC_KEY).ok
    report = verify_chain(chain[:-3], MAC_KEY, expected_head=chain[-1].head)
    assert [(p.position, p.kind) for p in report.problems] == [(97, ProblemKind.TRUNCATED)]
    assert verify_chain(chain, MAC_KEY, expected_head=chain[-1].head).ok


@pytest.mark.parametrize("position", [0, 49, 98])
def test_swapped_neighbours_are_found(chain: list[SealedAuditRecord], position: int) -> None:
    tampered = list(chain)
    tampered[position], tampered[position + 1] = tampered[position + 1], tampered[position]
    report = verify_chain(tampered, MAC_KEY)
    assert {p.kind for p in report.problems} == {ProblemKind.REORDERED}
    assert {p.position for p in report.problems} == {position, position + 1}


def test_record_moved_far_is_found(chain: list[SealedAuditRecord]) -> None:
    tampered = list(chain)
    moved = tampered.pop(10)
    tampered.insert(80, moved)
    report = verify_chain(tampered, MAC_KEY)
    assert report.problems
    assert {p.kind for p in report.problems} == {ProblemKind.REORDERED}
    assert report.kinds_at(10) == {ProblemKind.REORDERED}
    assert report.kinds_at(80) == {ProblemKind.REORDERED}


@pytest.mark.parametrize(
    "changes",
    [
        {"decision": "refused"},
        {"reason": "allowed by rule cold"},
        {"client_id": "someone-else"},
        {"key_id": None},
        {"time": "2030-01-01T00:00:00.000Z"},
        {"seq": 52},
        {"seq": 7},
        {"seq": 1000},
    ],
)
def test_altered_record_is_found(
    chain: list[SealedAuditRecord], changes: dict[str, object]
) -> None:
    tampered = list(chain)
    tampered[50] = altered(chain[50], **changes)
    report = verify_chain(tampered, MAC_KEY)
    assert report.kinds_at(50) == {ProblemKind.ALTERED}
    assert {p.position for p in report.problems} == {50}


@pytest.mark.parametrize("field", ["prev_hash", "mac", "hash"])
def test_altered_digests_are_found(chain: list[SealedAuditRecord], field: str) -> None:
    tampered = list(chain)
    value = getattr(chain[50], field)
    tampered[50] = dataclasses.replace(chain[50], **{field: bytes([value[0] ^ 1]) + value[1:]})
    report = verify_chain(tampered, MAC_KEY)
    assert [(p.position, p.kind) for p in report.problems] == [(50, ProblemKind.ALTERED)]


def test_forged_insertion_is_found(chain: list[SealedAuditRecord]) -> None:
    forged = altered(chain[50], reason="nothing to see here")
    tampered = [*chain[:51], forged, *chain[51:]]
    report = verify_chain(tampered, MAC_KEY)
    assert [(p.position, p.kind) for p in report.problems] == [(51, ProblemKind.INSERTED)]


def test_replayed_record_is_found(chain: list[SealedAuditRecord]) -> None:
    tampered = [*chain[:60], chain[20], *chain[60:]]
    report = verify_chain(tampered, MAC_KEY)
    assert [(p.position, p.kind) for p in report.problems] == [(60, ProblemKind.INSERTED)]


def test_record_from_a_fork_is_found(chain: list[SealedAuditRecord]) -> None:
    """A genuine record numbered right but chained to another history (the enclave was
    seeded with an older head) breaks the link."""
    fork_signer = AuditSigner(MAC_KEY, "node-a", last=chain[29], now=ticking_clock())
    fork = [seal_one(fork_signer, n) for n in range(5)]
    tampered = [*chain[:30], *fork[:1], *chain[31:]]
    report = verify_chain(tampered, MAC_KEY)
    assert report.kinds_at(30) == set()  # record 31 of the fork follows record 30 correctly
    assert report.kinds_at(31) == {ProblemKind.BROKEN_LINK}


def test_wrong_mac_key_is_found(chain: list[SealedAuditRecord]) -> None:
    report = verify_chain(chain, OTHER_KEY)
    assert [(p.position, p.kind) for p in report.problems] == [(0, ProblemKind.BAD_MAC)]
    assert "wrong MAC key" in report.problems[0].detail


def test_chain_sealed_with_another_key_mixed_in_is_found(chain: list[SealedAuditRecord]) -> None:
    other = build_chain(100, AuditSigner(OTHER_KEY, "node-a", now=ticking_clock()))
    tampered = [*chain[:70], *other[70:]]
    report = verify_chain(tampered, MAC_KEY)
    assert {p.position for p in report.problems} == set(range(70, 100))
    assert {p.kind for p in report.problems} == {ProblemKind.ALTERED}


def test_rotated_log_verifies_from_its_start(chain: list[SealedAuditRecord]) -> None:
    assert verify_chain(chain[40:], MAC_KEY, start=chain[39].head).ok
    assert verify_chain(chain[40:], MAC_KEY, start=None).ok
    report = verify_chain(chain[40:], MAC_KEY)
    assert [(p.position, p.kind) for p in report.problems] == [(0, ProblemKind.REMOVED)]
    assert report.problems[0].detail == "records 1-40 are missing"


def test_signer_continues_a_chain_only_from_a_genuine_record(
    chain: list[SealedAuditRecord],
) -> None:
    signer = AuditSigner(MAC_KEY, "node-a", last=chain[-1])
    assert signer.head == chain[-1].head
    sealed = seal_one(signer, 100)
    assert sealed.record.seq == 101 and sealed.prev_hash == chain[-1].hash
    assert verify_chain([*chain, sealed], MAC_KEY).ok
    with pytest.raises(IntegrityError, match="does not verify"):
        AuditSigner(MAC_KEY, "node-a", last=altered(chain[-1], reason="x"))
    with pytest.raises(IntegrityError, match="does not verify"):
        AuditSigner(OTHER_KEY, "node-a", last=chain[-1])


def test_mac_key_stays_secret() -> None:
    with pytest.raises(ConfigurationError, match="at least 32 bytes"):
        AuditSigner(Secret(b"short"), "n")
    signer = AuditSigner(MAC_KEY, "node-a")
    assert MAC_KEY.reveal_bytes().hex() not in repr(signer)
    assert repr(signer) == "AuditSigner(node='node-a', seq=0)"


def test_json_lines_round_trip(chain: list[SealedAuditRecord]) -> None:
    for sealed in chain[:5]:
        line = sealed.to_json()
        assert "\n" not in line
        assert SealedAuditRecord.from_json(line) == sealed
        assert SealedAuditRecord.from_json(line.encode()) == sealed


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: d.pop("mac"),
        lambda d: d.update(extra=1),
        lambda d: d.update(mac="zz"),
        lambda d: d.update(mac="00"),
        lambda d: d["record"].pop("seq"),
        lambda d: d["record"].update(colour="red"),
        lambda d: d["record"].update(seq="1"),
        lambda d: d["record"].update(seq=0),
        lambda d: d["record"].update(decision="maybe"),
        lambda d: d["record"].update(reason=None),
        lambda d: d["record"].update(rule=7),
        lambda d: d.update(record=[]),
    ],
)
def test_malformed_lines_are_integrity_errors(
    chain: list[SealedAuditRecord], mangle: object
) -> None:
    data = json.loads(chain[0].to_json())
    mangle(data)  # type: ignore[operator]
    with pytest.raises(IntegrityError):
        SealedAuditRecord.from_json(json.dumps(data))


@pytest.mark.parametrize("line", ["", "{", "[]", "null", '"x"', b"\xff"])
def test_garbage_lines_are_integrity_errors(line: str | bytes) -> None:
    with pytest.raises(IntegrityError):
        SealedAuditRecord.from_json(line)


def test_record_validation() -> None:
    fields = dict(
        seq=1,
        time="t",
        node="n",
        client_id=None,
        operation="o",
        key_id=None,
        chain=None,
        decision="allowed",
        rule=None,
        reason="r",
        request_sha256=None,
        result_sha256=None,
    )
    assert AuditRecord(**fields).seq == 1  # type: ignore[arg-type]
    with pytest.raises(IntegrityError, match="seq"):
        AuditRecord(**{**fields, "seq": True})  # type: ignore[arg-type]


@pytest.mark.parametrize("reason", ["plain", 'quote " and \\ backslash', "non-ASCII é ✓ \u2028"])
def test_log_line_from_kept_canonical_bytes_is_the_json_encoding(reason: str) -> None:
    """A sealed record keeps its canonical bytes and builds its log line from them; the line
    is exactly what encoding the whole record as sorted JSON gives, and reads back."""
    sealed = AuditSigner(MAC_KEY, "node", now=ticking_clock()).seal(
        operation="sign:hash", decision="allowed", reason=reason, client_id="c"
    )
    assert sealed.canonical is not None
    recoded = dataclasses.replace(sealed, canonical=None)
    assert sealed.to_json() == recoded.to_json()
    assert json.loads(sealed.to_json())["record"]["reason"] == reason
    assert SealedAuditRecord.from_json(sealed.to_json()) == sealed


def test_record_times_match_datetime_rounding() -> None:
    """The cached formatting of record times gives what ``datetime`` gives, at the edges of
    milliseconds and seconds too."""
    from datetime import UTC, datetime

    from signd.audit.records import rfc3339

    edges = [0.0, 0.0005, 0.0009995, 0.9995, 0.9999995, 0.999999, 1.0000004]
    for base in (0, 1_700_000_000, 4_102_444_799):
        for edge in edges:
            stamp = base + edge
            expected = datetime.fromtimestamp(stamp, UTC).isoformat(timespec="milliseconds")
            assert rfc3339(stamp) == expected.replace("+00:00", "Z")


@given(
    text=st.text(max_size=40),
    optional=st.none() | st.text(max_size=20),
    seq=st.integers(min_value=1, max_value=2**63),
    value=st.none() | st.integers(min_value=1, max_value=2**256),
    results=st.none() | st.lists(st.text(max_size=70), min_size=2, max_size=5),
    policy=st.none() | st.text(max_size=70),
    clients=st.none() | st.text(max_size=70),
)
def test_canonical_bytes_are_sorted_ascii_json(
    text: str,
    optional: str | None,
    seq: int,
    value: int | None,
    results: list[str] | None,
    policy: str | None,
    clients: str | None,
) -> None:
    """The hand-written canonical form is byte for byte the JSON encoding it stands for,
    whatever the text holds (quotes, control characters, any Unicode)."""
    from signd.audit.records import AuditRecord, Spend

    record = AuditRecord(
        seq=seq,
        time="2026-11-22T00:00:00.000Z",
        node=text,
        client_id=optional,
        operation=text[:5] or "op",
        key_id=optional,
        chain=None,
        decision="allowed",
        rule=optional,
        reason=text,
        request_sha256=optional,
        result_sha256=None,
        spend=None if value is None else Spend(text or "r", optional or "k", value),
        results_sha256=None if results is None else tuple(results),
        policy_sha256=policy,
        clients_sha256=clients,
    )
    assert ("results_sha256" in record.to_dict()) is (results is not None)
    assert ("policy_sha256" in record.to_dict()) is (policy is not None)
    assert ("clients_sha256" in record.to_dict()) is (clients is not None)
    expected = json.dumps(
        record.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    ).encode("ascii")
    assert record.canonical() == expected


@settings(max_examples=200, deadline=None)
@given(key=st.binary(min_size=32, max_size=200), canonical=st.binary(max_size=600))
def test_the_precomputed_record_mac_is_hmac_sha256(key: bytes, canonical: bytes) -> None:
    """The keyed HMAC copied per record gives the MAC of a fresh one, whatever the key's
    length (keys longer than SHA-256's block are hashed first) and however many records."""
    prev_hash = hashlib.sha256(canonical).digest()
    expected = hmac.new(key, canonical + prev_hash, hashlib.sha256).digest()
    record_mac = RecordMac(Secret(key))
    assert record_mac(canonical, prev_hash) == expected
    other = canonical + b"!"
    assert record_mac(other, prev_hash) == hmac.new(key, other + prev_hash, "sha256").digest()
    assert record_mac(canonical, prev_hash) == expected  # the keyed state is never used up
    assert compute_mac(Secret(key), canonical, prev_hash) == expected
    assert "<secret>" in repr(record_mac)


def _record_fields() -> dict[str, Any]:
    return seal_one(AuditSigner(MAC_KEY, "node-a"), 1).record.to_dict()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("seq", "1"),
        ("seq", True),
        ("seq", 0),
        ("decision", "maybe"),
        ("time", 5),
        ("node", None),
        ("operation", ["sign"]),
        ("reason", None),
        ("client_id", 3),
        ("key_id", b"k"),
        ("chain", 1.5),
        ("rule", {}),
        ("request_sha256", 7),
        ("result_sha256", []),
        ("results_sha256", None),
        ("results_sha256", "ab"),
        ("results_sha256", ["ab"]),
        ("results_sha256", ["ab", 1]),
        ("results_sha256", []),
        ("policy_sha256", None),
        ("policy_sha256", 5),
        ("clients_sha256", None),
        ("clients_sha256", ["ab"]),
    ],
)
def test_a_record_field_of_the_wrong_type_is_refused(name: str, value: object) -> None:
    data = _record_fields() | {name: value}
    with pytest.raises(IntegrityError, match=name):
        AuditRecord.from_dict(data)


@pytest.mark.parametrize("change", ["missing", "unknown", "not a mapping"])
def test_a_record_with_missing_or_unknown_fields_is_refused(change: str) -> None:
    data: Any = _record_fields()
    if change == "missing":
        del data["reason"]
    elif change == "unknown":
        data["extra"] = 1
    else:
        data = list(data.items())
    with pytest.raises(IntegrityError, match="missing or unknown fields"):
        AuditRecord.from_dict(data)


def test_a_whole_record_parses_back_to_itself() -> None:
    data = _record_fields()
    assert AuditRecord.from_dict(data).to_dict() == data


def test_a_record_of_several_signatures_seals_parses_and_verifies() -> None:
    """One decision over several signatures lists each result's digest, in order; the list
    is covered by the MAC like every other field."""
    signer = AuditSigner(MAC_KEY, "node-a", now=ticking_clock())
    results = tuple(f"{n:064x}" for n in range(3))
    sealed = [
        seal_one(signer, 1),
        signer.seal(
            operation="sign:hash",
            decision="allowed",
            reason="allowed by rule blind",
            client_id="client-1",
            key_id="key-1",
            chain="ethereum",
            rule="blind",
            request_sha256="ab" * 32,
            results_sha256=results,
        ),
        seal_one(signer, 2),
    ]
    line = sealed[1].to_json()
    assert json.loads(line)["record"]["results_sha256"] == list(results)
    parsed = SealedAuditRecord.from_json(line)
    assert parsed.record == sealed[1].record
    assert parsed.record.result_sha256 is None
    assert verify_chain([SealedAuditRecord.from_json(s.to_json()) for s in sealed], MAC_KEY).ok
    for changed in (results[::-1], results[:2], (*results, "00" * 32)):
        tampered = [sealed[0], altered(sealed[1], results_sha256=changed), sealed[2]]
        assert verify_chain(tampered, MAC_KEY).kinds_at(1) == {ProblemKind.ALTERED}


def test_a_record_names_its_policy_and_clients_under_the_mac() -> None:
    """The SHA-256s of the policy and clients files a decision was made under are part of
    the record the MAC covers: changing either, adding one to a record sealed without, or
    taking it away, is found; a record sealed without them (an older log) verifies as it
    did."""
    signer = AuditSigner(MAC_KEY, "node-a", now=ticking_clock())
    policy, clients = "a1" * 32, "c1" * 32
    sealed = [
        seal_one(signer, 1),  # as sealed before records named their policy
        signer.seal(
            operation="sign:message",
            decision="allowed",
            reason="allowed by rule hot-messages",
            client_id="client-1",
            rule="hot-messages",
            policy_sha256=policy,
            clients_sha256=clients,
        ),
        seal_one(signer, 2),
    ]
    read = [SealedAuditRecord.from_json(record.to_json()) for record in sealed]
    assert "policy_sha256" not in json.loads(sealed[0].to_json())["record"]
    assert json.loads(sealed[1].to_json())["record"]["policy_sha256"] == policy
    assert (read[1].record.policy_sha256, read[1].record.clients_sha256) == (policy, clients)
    assert verify_chain(read, MAC_KEY).ok
    for position, changes in [
        (1, {"policy_sha256": "a2" * 32}),
        (1, {"clients_sha256": "c2" * 32}),
        (1, {"policy_sha256": None}),
        (0, {"policy_sha256": policy}),
    ]:
        tampered = list(read)
        tampered[position] = altered(read[position], **changes)
        assert verify_chain(tampered, MAC_KEY).kinds_at(position) == {ProblemKind.ALTERED}


def test_verify_chain_names_each_run_of_a_configuration_from_its_first_record() -> None:
    """A new run starts where a record names another policy or clients file (a reload, or
    one undone); a record that names none, such as ``audit:resume``, stays in its run."""
    signer = AuditSigner(MAC_KEY, "node-a", now=ticking_clock())
    a, b, clients = "a1" * 32, "b1" * 32, "c1" * 32
    named = [a, a, None, a, b, b, a, None]
    chain = [
        seal_one(signer, 0),  # sealed before records named their policy
        *(
            signer.seal(
                operation="audit:resume" if policy is None else "sign:hash",
                decision="refused",
                reason="r",
                policy_sha256=policy,
                clients_sha256=None if policy is None else clients,
            )
            for policy in named
        ),
    ]
    report = verify_chain(chain, MAC_KEY)
    assert report.ok, report.problems
    assert [(run.from_seq, run.policy_sha256) for run in report.policies] == [
        (1, None),
        (2, a),
        (6, b),
        (8, a),
    ]
    assert {run.clients_sha256 for run in report.policies[1:]} == {clients}
    forged = [*chain[:5], altered(chain[5], policy_sha256=a), *chain[6:]]
    assert [run.from_seq for run in verify_chain(forged, MAC_KEY).policies] == [1, 2, 7, 8]
