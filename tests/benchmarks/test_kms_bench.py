"""The KMS benchmarks run end to end at a tiny size and clean up after themselves.

Nothing here checks speed: only that each benchmark answers positive, finite figures under the
expected names and leaves no process or temp dir behind.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from signd.benchmarks import enclave
from signd.benchmarks.harness import REGISTRY, _load_all

pytestmark = pytest.mark.integration

EXPECTED = {
    "kms-server-throughput": (
        ("kms-server GenerateDataKey via boto3", "req/s", "moto_server GenerateDataKey"),
        ("kms-server Decrypt via boto3", "req/s", "moto_server Decrypt"),
    ),
    "kms-attestation-cold-sign": (
        ("enclave cold sign p50 with Recipient", "ms", "same, attestation off"),
    ),
}


def _children() -> set[int]:
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
    base = Path(tempfile.mkdtemp(prefix="sk-"))
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_the_kms_benchmarks_are_registered() -> None:
    _load_all()
    assert {name for name in REGISTRY if name.startswith("kms-")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_kms_benchmark_runs_at_tiny_size(
    name: str, short_tempdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if name == "kms-server-throughput" and importlib.util.find_spec("moto") is None:
        pytest.skip("moto[server] is not installed")
    _load_all()
    monkeypatch.setenv(enclave.SIZE_ENV, "tiny")
    before = _children()

    results = REGISTRY[name](True)

    assert len(results) == len(EXPECTED[name])
    for result, (prefix, unit, baseline) in zip(results, EXPECTED[name], strict=True):
        assert result.name.startswith(prefix)
        assert result.baseline_name.startswith(baseline)
        assert result.unit == unit
        for figure in (result.value, result.baseline_value):
            assert math.isfinite(figure) and figure > 0
    assert _children() <= before
    assert list(short_tempdir.iterdir()) == []
