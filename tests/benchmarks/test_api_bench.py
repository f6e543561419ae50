"""The service benchmarks run end to end at a tiny size and clean up after themselves.

Figures at this size mean nothing, so nothing here checks speed: only that each benchmark
answers positive, finite figures under the expected names, and leaves no temp dir or
process behind. The load comes from wrk when it is installed, else from the Python
generator; one test forces the Python generator so that both are exercised.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from signd.benchmarks import api
from signd.benchmarks.harness import REGISTRY, BenchResult
from tests.benchmarks.test_enclave_bench import _children

pytestmark = pytest.mark.integration

EXPECTED = {
    "api-sign-hash": (
        ("REST POST /v1/sign/hash, 4 connections", "req/s"),
        ("REST POST /v1/sign/hash latency p50, 4 connections", "ms"),
        ("REST POST /v1/sign/hash latency p99, 4 connections", "ms"),
    ),
    "api-sign-batch": (
        ("REST POST /v1/sign/batch, 10 hashes per request over 2 keys, 2 clients", "sig/s"),
    ),
    "api-eth-tx": (("REST EIP-1559 tx sign, 4 connections", "tx/s"),),
    "api-sign-hash-enclave": (
        ("REST POST /v1/sign/hash, enclave custody and gate, 4 connections", "req/s"),
        ("REST POST /v1/sign/hash latency p50, enclave custody and gate, 4 connections", "ms"),
        ("REST POST /v1/sign/hash latency p99, enclave custody and gate, 4 connections", "ms"),
    ),
    "api-sign-batch-enclave": (
        (
            "REST POST /v1/sign/batch, 10 hashes per request over 2 keys, enclave custody and "
            "gate, 2 clients",
            "sig/s",
        ),
    ),
    "api-eth-tx-enclave": (
        ("REST EIP-1559 tx sign, enclave custody and gate, 4 connections", "tx/s"),
    ),
    "api-sign-batch-cold-enclave": (
        (
            "REST POST /v1/sign/batch, 10 hashes over as many keys created together and never "
            "used, enclave custody and gate, one client",
            "sig/s",
        ),
    ),
    "api-rpc-batch": (("JSON-RPC batch of 10 personal_sign over 2 keys, 2 clients", "sig/s"),),
    "api-rpc-batch-enclave": (
        (
            "JSON-RPC batch of 10 personal_sign over 2 keys, enclave custody and gate, 2 clients",
            "sig/s",
        ),
    ),
}


@pytest.fixture
def own_tempdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """tempfile's default folder, fresh, to check that the benchmark empties it."""
    base = Path(tempfile.mkdtemp(prefix="sb-api-"))
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    yield base
    shutil.rmtree(base, ignore_errors=True)


WITHOUT_LOAD_GENERATOR = {"api-sign-batch-cold-enclave"}
"""Benchmarks that time single requests of their own instead of running wrk."""


def _check(name: str, results: list[BenchResult], generator: str) -> None:
    assert len(results) == len(EXPECTED[name])
    for result, (prefix, unit) in zip(results, EXPECTED[name], strict=True):
        assert isinstance(result, BenchResult)
        assert result.name.startswith(prefix)
        if name not in WITHOUT_LOAD_GENERATOR:
            assert result.name.endswith(f"({generator})")
        assert result.unit == unit
        for figure in (result.value, result.baseline_value, result.ratio):
            assert math.isfinite(figure)
            assert figure > 0
        assert result.target


def test_every_api_benchmark_is_registered() -> None:
    assert {name for name in REGISTRY if name.startswith("api-")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_benchmark_runs_at_tiny_size(
    name: str, own_tempdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(api.SIZE_ENV, "tiny")
    children_before = _children()

    results = REGISTRY[name](True)

    _check(name, results, api.load_generator()[0])
    if name.startswith("api-sign-hash"):
        assert results[0].baseline_name.endswith(f"({api.uvicorn_implementations()})")
    assert list(own_tempdir.iterdir()) == []
    assert _children() <= children_before


def test_the_python_load_generator_stands_in_for_wrk(
    own_tempdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(api.SIZE_ENV, "tiny")
    monkeypatch.setattr(api.shutil, "which", lambda command: None)
    children_before = _children()

    results = REGISTRY["api-sign-hash"](True)

    _check("api-sign-hash", results, "Python asyncio load")
    assert list(own_tempdir.iterdir()) == []
    assert _children() <= children_before


def test_the_baseline_names_the_uvicorn_implementations_both_servers_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    installed = {"uvloop"}
    monkeypatch.setattr(
        api.importlib.util, "find_spec", lambda name: object() if name in installed else None
    )
    assert api.uvicorn_implementations() == "uvloop + h11"
    installed.add("httptools")
    assert api.uvicorn_implementations() == "uvloop + httptools"
    installed.clear()
    assert api.uvicorn_implementations() == "asyncio + h11"


def test_sizes_follow_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(api.SIZE_ENV, raising=False)
    assert api.sizes(quick=True) == api.QUICK
    assert api.sizes(quick=False) == api.FULL
    assert api.FULL.connections == 50
    monkeypatch.setenv(api.SIZE_ENV, "tiny")
    assert api.sizes(quick=False) == api.TINY
