"""The host's JSON-lines log: append, reopen, continue the chain, find edits on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from signd.audit import GENESIS_HASH, AuditSigner, FileAuditLog, ProblemKind, verify_chain
from signd.audit.log import AuditLog, AuditOrderError
from signd.errors import DependencyUnavailable, IntegrityError
from tests.audit.conftest import MAC_KEY, build_chain, seal_one, ticking_clock


def fill(path: Path, count: int) -> None:
    with FileAuditLog(path) as log:
        signer = AuditSigner(MAC_KEY, "node-a", last=log.last_record(), now=ticking_clock())
        for n in range(count):
            log.append(seal_one(signer, n))


def test_new_log_starts_at_genesis(tmp_path: Path) -> None:
    with FileAuditLog(tmp_path / "audit.jsonl") as log:
        assert log.last_hash() == GENESIS_HASH
        assert log.last_record() is None
        assert list(log.records()) == []
    assert (tmp_path / "audit.jsonl").exists()


def test_reopened_log_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    fill(path, 60)
    with FileAuditLog(path) as log:
        last = log.last_record()
        assert last is not None and last.record.seq == 60
        assert log.last_hash() == last.hash
    fill(path, 40)
    with FileAuditLog(path) as log:
        records = list(log.records())
        assert [s.record.seq for s in records] == list(range(1, 101))
        report = verify_chain(records, MAC_KEY, expected_head=log.head)
    assert report.ok, report.problems
    assert len(path.read_text().splitlines()) == 100


def test_log_is_an_audit_log(tmp_path: Path) -> None:
    log: AuditLog = FileAuditLog(tmp_path / "audit.jsonl")
    assert log.last_hash() == GENESIS_HASH


def test_append_refuses_a_record_that_does_not_extend_the_chain(tmp_path: Path) -> None:
    chain = build_chain(5)
    with FileAuditLog(tmp_path / "audit.jsonl", order_timeout=0.05) as log:
        log.append(chain[0])
        with pytest.raises(AuditOrderError, match=r"record 3 waited 0\.05 s for record 2"):
            log.append(chain[2])
        with pytest.raises(AuditOrderError, match="record 1 does not extend"):
            log.append(chain[0])
        with pytest.raises(IntegrityError, match="record 3 does not follow record 1"):
            log.append_many([chain[0], chain[2]])
        log.append(chain[1])
        log.append(chain[2])  # in its turn now
        assert [s.record.seq for s in log.records()] == [1, 2, 3]


def test_long_lines_and_long_logs_are_tailed(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    signer = AuditSigner(MAC_KEY, "node-a", now=ticking_clock())
    with FileAuditLog(path) as log:
        for n in range(300):
            log.append(signer.seal(operation="sign:hash", decision="refused", reason="r" * (n * 7)))
    with FileAuditLog(path) as log:
        last = log.last_record()
        assert last is not None and last.record.seq == 300 and last.record.reason == "r" * 2093


def test_edit_on_disk_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    fill(path, 20)
    lines = path.read_text().splitlines()
    data = json.loads(lines[6])
    assert data["record"]["decision"] == "refused"
    data["record"]["decision"] = "allowed"
    data["record"]["reason"] = "allowed by rule hot-eth"
    lines[6] = json.dumps(data)
    del lines[12]
    path.write_text("\n".join(lines) + "\n")
    with FileAuditLog(path) as log:
        report = verify_chain(log.records(), MAC_KEY)
    assert [(p.position, p.kind) for p in report.problems] == [
        (6, ProblemKind.ALTERED),
        (12, ProblemKind.REMOVED),
    ]


def test_torn_last_line_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    fill(path, 3)
    with path.open("ab") as file:
        file.write(b'{"record": {"seq"')
    with pytest.raises(IntegrityError, match="torn line"):
        FileAuditLog(path)


def test_garbage_last_line_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    fill(path, 3)
    with path.open("ab") as file:
        file.write(b"hello\n")
    with pytest.raises(IntegrityError, match="last line"):
        FileAuditLog(path)


def test_garbage_in_the_middle_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    fill(path, 5)
    lines = path.read_text().splitlines()
    lines[2] = "not json"
    path.write_text("\n".join(lines) + "\n")
    with FileAuditLog(path) as log, pytest.raises(IntegrityError, match="audit log line 3"):
        list(log.records())


def test_a_host_cannot_seed_the_signer_with_a_forged_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    fill(path, 3)
    lines = path.read_text().splitlines()
    data = json.loads(lines[-1])
    data["record"]["reason"] = "forged"
    lines[-1] = json.dumps(data)
    path.write_text("\n".join(lines) + "\n")
    with FileAuditLog(path) as log, pytest.raises(IntegrityError, match="does not verify"):
        AuditSigner(MAC_KEY, "node-a", last=log.last_record())


@pytest.mark.parametrize("replaced", [False, True], ids=["moved away", "replaced"])
def test_a_log_file_gone_from_its_path_takes_no_records(tmp_path: Path, replaced: bool) -> None:
    """The open file renamed away (its folder swapped, a volume unmounted under it) or
    replaced: records appended to it would not be in the log at ``path``, so appends are
    refused and check_health says why, until the file is back."""
    path = tmp_path / "audit.log"
    away = tmp_path / "away.log"
    chain = build_chain(3)
    with FileAuditLog(path) as log:
        log.append(chain[0])
        path.rename(away)
        if replaced:
            path.write_bytes(b"")
        with pytest.raises(DependencyUnavailable, match="not the file"):
            log.check_health()
        with pytest.raises(DependencyUnavailable, match="not the file"):
            log.append(chain[1])
        if replaced:
            path.unlink()
        away.rename(path)
        log.check_health()
        log.append(chain[1])
    assert [sealed.record.seq for sealed in FileAuditLog(path).records()] == [1, 2]
