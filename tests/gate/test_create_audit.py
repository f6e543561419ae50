"""``keys:create`` while the audit log cannot take records: no key is made while the log is
known to be down, and a key made just before it failed (the caller got 503, so nobody was
told its address) is named in a warning for an operator. Through both gates; the enclave's
gate makes sealed keys in the enclave and approves keystore ones for the host to make."""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.files import immutable
from tests.gate.support import BOTH_GATES, Gated

pytestmark = BOTH_GATES

KEY_ID = re.compile(r"\b[0-9a-f]{32}\b")
CUSTODY_OF: dict[str, list[str]] = {"host": ["keystore"], "enclave": ["enclave", "keystore"]}


def create(gated: Gated, custody: str) -> Any:
    return gated.signed(
        "POST", "/v1/keys", {"chain": "ethereum", "custody": custody, "labels": ["hot"]}
    )


def key_ids(gated: Gated, custody: str) -> set[str]:
    page = gated.signer.list_keys(custody=custody, limit=1000)
    return {key.key_id for key in page.keys}


def blob_count(gated: Gated) -> int:
    blobs = gated.paths.audit_log.parent / "blobs"
    return sum(1 for path in blobs.rglob("*") if path.is_file()) if blobs.exists() else 0


def dependency_unavailable(answer: Any) -> None:
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "dependency_unavailable"


@contextmanager
def fsync_failing_once(path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Within, the first ``os.fsync`` of the file at ``path`` fails (EIO); every other
    fsync (the enclave's blob writes, undoing the failed write) works."""
    real_fsync = os.fsync
    target = os.stat(path)
    failed: list[int] = []

    def fsync(fd: int) -> None:
        found = os.fstat(fd)
        if not failed and (found.st_dev, found.st_ino) == (target.st_dev, target.st_ino):
            failed.append(fd)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    try:
        yield
    finally:
        monkeypatch.setattr(os, "fsync", real_fsync)
    assert failed, "the audit log was never synced"


def test_no_key_is_made_while_the_audit_log_is_down(
    gated: Gated, hot_key: dict[str, Any], gate_mode: str
) -> None:
    """The log file refuses writes and the undo of a failed one (``chattr +i``): once a
    signature has found that out, every create is refused before any key is made (none in
    custody, no sealed blob written), and creates work again once the file does."""
    before = {custody: key_ids(gated, custody) for custody in CUSTODY_OF[gate_mode]}
    blobs = blob_count(gated)
    with immutable(gated.paths.audit_log):
        message = {"key": hot_key["key_id"], "message": "finds the log down"}
        dependency_unavailable(gated.signed("POST", "/v1/sign/ethereum/message", message))
        assert gated.client.get("/readyz").status_code == 503
        for custody in CUSTODY_OF[gate_mode]:
            for _ in range(3):
                dependency_unavailable(create(gated, custody))
            assert key_ids(gated, custody) == before[custody]
    assert blob_count(gated) == blobs
    for custody in CUSTODY_OF[gate_mode]:
        answer = create(gated, custody)
        assert answer.status_code == 201, answer.text
        [made] = answer.json()["keys"]
        assert key_ids(gated, custody) == before[custody] | {made["key_id"]}


def test_a_key_made_as_its_record_failed_is_named_for_the_operator(
    gated: Gated,
    gate_mode: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The log fails at the create's own record (after the check said it was fine): the
    caller gets 503 and no address. A key made before the record failed is never listed
    as created by anyone, so a warning names its key id (no secret); a key the host would
    make after the enclave's approval is not made at all."""
    assert create(gated, "keystore").status_code == 201  # the log exists and has records
    caplog.set_level(logging.WARNING)
    for custody in CUSTODY_OF[gate_mode]:
        before = key_ids(gated, custody)
        caplog.clear()
        with fsync_failing_once(gated.paths.audit_log, monkeypatch):
            dependency_unavailable(create(gated, custody))
        made = key_ids(gated, custody) - before
        warned = unrecorded_key_ids(caplog.records)
        if gate_mode == "enclave":
            assert made == set()  # the host records an enclave key only once audited
            if custody == "keystore":
                assert warned == set()  # approved, but not made: the approval is not on record
            else:
                assert len(warned) == 1  # sealed in the enclave, unusable: never recorded
        else:
            assert made == warned and len(made) == 1
        assert create(gated, custody).status_code == 201  # and the log goes on


def unrecorded_key_ids(records: list[logging.LogRecord]) -> set[str]:
    """The key ids the warnings about keys made without their audit record name."""
    return {
        key_id
        for record in records
        if record.levelno == logging.WARNING and "no audit record" in record.getMessage()
        for key_id in KEY_ID.findall(record.getMessage())
    }
