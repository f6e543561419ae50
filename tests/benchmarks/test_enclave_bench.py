"""The enclave benchmarks run end to end at a tiny size and clean up after themselves.

Figures at this size mean nothing, so nothing here checks speed: only that each benchmark
answers positive, finite figures under the expected names, and leaves no temp dir or process.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from signd.benchmarks import enclave
from signd.benchmarks.harness import REGISTRY, BenchResult

pytestmark = pytest.mark.integration

EXPECTED = {
    "enclave-keygen": (
        ("enclave address generation, 1 per request (", "keys/s"),
        ("enclave address generation, 1 per request, 4 concurrent callers", "keys/s"),
        ("enclave address generation, 25 per request", "keys/s"),
    ),
    "enclave-sign-warm": (
        ("enclave warm signing, pipelined SIGN_DIGEST", "sig/s"),
        ("enclave warm signing, SIGN_DIGESTS batches of 25", "sig/s"),
    ),
    "enclave-sign-cold": (
        ("enclave cold signing p50", "ms"),
        ("enclave cold signing p99", "ms"),
    ),
    "enclave-startup": (("enclave start-up to first signature, 50 stored keys", "s"),),
}


def _children() -> set[int]:
    """Ids of this process's live child processes (from /proc)."""
    me = str(os.getpid())
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


@pytest.fixture
def short_tempdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """tempfile's default folder, kept short so Unix socket paths inside it fit."""
    base = Path(tempfile.mkdtemp(prefix="sb-"))
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_every_enclave_benchmark_is_registered() -> None:
    assert {name for name in REGISTRY if name.startswith("enclave-")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_benchmark_runs_at_tiny_size(
    name: str, short_tempdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(enclave.SIZE_ENV, "tiny")
    children_before = _children()

    results = REGISTRY[name](True)

    assert len(results) == len(EXPECTED[name])
    for result, (prefix, unit) in zip(results, EXPECTED[name], strict=True):
        assert isinstance(result, BenchResult)
        assert result.name.startswith(prefix)
        assert result.unit == unit
        for figure in (result.value, result.baseline_value, result.ratio):
            assert math.isfinite(figure)
            assert figure > 0
        assert result.target
    assert list(short_tempdir.iterdir()) == []
    assert _children() <= children_before


def test_sizes_follow_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(enclave.SIZE_ENV, raising=False)
    assert enclave.sizes(quick=True) == enclave.QUICK
    assert enclave.sizes(quick=False) == enclave.FULL
    assert enclave.FULL.stored_keys == 1_000_000
    monkeypatch.setenv(enclave.SIZE_ENV, "tiny")
    assert enclave.sizes(quick=False) == enclave.TINY
