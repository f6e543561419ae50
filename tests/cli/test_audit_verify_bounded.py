"""``signd audit verify`` reads the log a line at a time: its memory does not grow with the
log, nor with one huge line, and it finds what reading the whole log at once finds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from signd.audit import AuditSigner, SealedAuditRecord, verify_chain
from signd.cli.context import state
from signd.cli.main import app
from signd.errors import IntegrityError
from tests.audit.conftest import MAC_KEY, seal_one, ticking_clock

MIB = 1024 * 1024
GROWTH_BOUND = 40 * MIB
"""How much more than on a one-record log verifying may take at its peak (a log of
100,000 records took about 270 MiB more when it was read whole)."""


def write_log(path: Path, count: int) -> list[bytes]:
    signer = AuditSigner(MAC_KEY, "node-a", now=ticking_clock())
    lines = [seal_one(signer, n).to_json().encode("ascii") for n in range(count)]
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return lines


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "audit.key"
    path.write_text(MAC_KEY.reveal_bytes().hex() + "\n")
    path.chmod(0o600)
    return path


PEAK_RSS_AT_EXIT = """
import atexit, runpy, sys

def write_peak(path=sys.argv[1]):
    with open("/proc/self/status") as status, open(path, "w") as out:
        out.write(next(line for line in status if line.startswith("VmHWM:")).split()[1])

atexit.register(write_peak)
sys.argv = ["signd", *sys.argv[2:]]
runpy.run_module("signd", run_name="__main__")
"""
"""Runs signd, then writes its peak RSS in KiB. Its own, as ``/proc`` tells it: a child's
``ru_maxrss`` counts its parent's peak too when it was forked from a large process."""


def verify_in_a_child(tmp_path: Path, log: Path, key_file: Path) -> tuple[int, dict[str, Any], int]:
    """``signd audit verify --json`` run as a process: its exit status, report and peak RSS
    (in bytes)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    peak = tmp_path / f"{log.name}.peak"
    command = [sys.executable, "-c", PEAK_RSS_AT_EXIT, str(peak), "--home", str(home)]
    command += ["audit", "verify", "--json", "--log", str(log), "--key", str(key_file)]
    done = subprocess.run(command, capture_output=True, timeout=120, check=False)
    return done.returncode, json.loads(done.stdout), int(peak.read_text()) * 1024


def test_a_large_log_verifies_in_bounded_memory(tmp_path: Path, key_file: Path) -> None:
    small, large = tmp_path / "small.log", tmp_path / "large.log"
    write_log(small, 1)
    lines = write_log(large, 100_000)
    code, report, baseline = verify_in_a_child(tmp_path, small, key_file)
    assert (code, report["records"]) == (0, 1), report
    code, report, peak = verify_in_a_child(tmp_path, large, key_file)
    assert code == 0 and report["ok"], report
    assert report["records"] == 100_000
    assert report["head"]["hash"] == json.loads(lines[-1])["hash"]
    assert peak - baseline < GROWTH_BOUND, (peak - baseline) / MIB


def test_a_huge_line_is_reported_without_being_read_whole(tmp_path: Path, key_file: Path) -> None:
    small, huge = tmp_path / "small.log", tmp_path / "huge.log"
    lines = write_log(small, 4)
    grown = lines[2].replace(b'"reason":"', b'"reason":"' + b"x" * (50 * MIB), 1)
    huge.write_bytes(b"\n".join([*lines[:2], grown, lines[3]]) + b"\n")
    code, report, baseline = verify_in_a_child(tmp_path, small, key_file)
    assert code == 0, report
    code, report, peak = verify_in_a_child(tmp_path, huge, key_file)
    assert code == 1
    assert report["problems"][0] == {
        "line": 3,
        "kind": "unreadable",
        "detail": "the line is longer than any audit record (65536)",
    }
    assert [problem["kind"] for problem in report["problems"][1:]] == ["removed"]
    assert peak - baseline < 20 * MIB, (peak - baseline) / MIB


def expected_problems(data: bytes) -> list[dict[str, object]]:
    """The problems found in ``data`` read whole, as ``bytes.splitlines`` splits it."""
    records: list[SealedAuditRecord] = []
    unreadable: list[dict[str, object]] = []
    for number, line in enumerate(data.splitlines(), start=1):
        try:
            records.append(SealedAuditRecord.from_json(line))
        except IntegrityError as exc:
            unreadable.append({"line": number, "kind": "unreadable", "detail": exc.message})
    report = verify_chain(records, MAC_KEY)
    return unreadable + [
        {"position": p.position, "seq": p.seq, "kind": str(p.kind), "detail": p.detail}
        for p in report.problems
    ]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda lines: [*lines[:3], b"", *lines[3:]], id="empty-line"),
        pytest.param(lambda lines: [*lines[:3], b"not json", *lines[4:]], id="garbage"),
        pytest.param(lambda lines: [*lines[:3], b"\x00" * 10, *lines[3:]], id="nul-bytes"),
        pytest.param(lambda lines: [*lines[:3], lines[3] + b"\xff\xfe", *lines[4:]], id="utf8"),
        pytest.param(
            lambda lines: [
                *lines[:3],
                lines[3].replace(b'"reason":"', b'"reason":"\\ud800'),
                *lines[4:],
            ],
            id="lone-surrogate",
        ),
        pytest.param(lambda lines: [*lines[:-1], lines[-1][:-40]], id="truncated-last-line"),
        pytest.param(lambda lines: [lines[0], lines[2], lines[1], *lines[3:]], id="reordered"),
        pytest.param(lambda lines: [lines[0], *lines[2:], lines[4]], id="removed-and-repeated"),
        pytest.param(
            lambda lines: [lines[0] + b"\r\r" + lines[1], *lines[2:]], id="empty-line-of-cr"
        ),
    ],
)
def test_damage_is_found_as_when_the_log_was_read_whole(
    tmp_path: Path, key_file: Path, damage: Any
) -> None:
    log = tmp_path / "audit.log"
    data = b"\r\n".join(damage(write_log(log, 8))) + b"\n"
    log.write_bytes(data)
    state.close()
    command = ["--home", str(tmp_path), "audit", "verify", "--json", "--log", str(log)]
    result = CliRunner().invoke(app, [*command, "--key", str(key_file)])
    state.close()
    report = json.loads(result.stdout)
    assert result.exit_code == 1
    assert report["problems"] == expected_problems(data) != []
