"""KMS benchmarks: ``signd kms-server`` against moto_server, and what attestation costs.

- ``kms-server-throughput``: GenerateDataKey and Decrypt requests per second through an
  unmodified boto3 client (one client, one request at a time), ``signd kms-server`` and
  ``moto_server`` each a subprocess on 127.0.0.1, measured in alternating rounds of one run.
  Skipped (no results) when moto[server] is not installed.
- ``kms-attestation-cold-sign``: cold-sign latency through a real ``signd enclave`` process on
  the embedded kms-server (cache flushed before each signature: blob read, KMS ``Decrypt``,
  unseal, sign), with ``Recipient`` (simulated NSM, CMS answer opened with the enclave's RSA
  key) against the same enclave with ``[enclave] attestation = "off"``, samples interleaved.

``SIGND_BENCH_SIZE=tiny`` (shared with the enclave benchmarks) shrinks every count.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from rich.console import Console

from signd.benchmarks.enclave import CHAIN, EnclaveProcess
from signd.benchmarks.enclave import sizes as enclave_sizes
from signd.benchmarks.harness import BenchResult, benchmark, paired_rates
from signd.enclave.client import EnclaveClient
from signd.kms.server import start_kms_server_process

STARTUP_TIMEOUT: Final = 30.0
_progress = Console(stderr=True)


def _counts(quick: bool) -> tuple[int, int, int]:
    """(requests per round, rounds, cold-sign samples) for this run's size."""
    size = enclave_sizes(quick)
    if size.latency_samples <= 10:
        return 20, 1, 6
    return (200, 5, 150) if quick else (500, 7, 400)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def _temp_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _moto_server(log_dir: Path) -> Iterator[str]:
    """``python -m moto.server`` on 127.0.0.1; its endpoint. Stopped (bounded) on exit."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with (log_dir / "moto.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {process.returncode}")
            try:
                with urllib.request.urlopen(endpoint + "/", timeout=1):  # noqa: S310 - http://
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not answer in time") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _data_key_calls(client: Any) -> tuple[Callable[[], object], Callable[[], object]]:
    """One GenerateDataKey and one Decrypt call against a new symmetric key of ``client``."""
    key_id = client.create_key()["KeyMetadata"]["KeyId"]
    context = {"service": "signd", "purpose": "bench"}
    blob = client.generate_data_key(KeyId=key_id, KeySpec="AES_256", EncryptionContext=context)[
        "CiphertextBlob"
    ]

    def generate() -> object:
        return client.generate_data_key(KeyId=key_id, KeySpec="AES_256", EncryptionContext=context)

    def decrypt() -> object:
        return client.decrypt(CiphertextBlob=blob, KeyId=key_id, EncryptionContext=context)

    return generate, decrypt


@benchmark("kms-server-throughput")
def kms_server_throughput(quick: bool) -> list[BenchResult]:
    """kms-server vs moto_server: GenerateDataKey and Decrypt requests/s through boto3."""
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        _progress.print("  skipped: moto[server] is not installed")
        return []
    import boto3

    requests, rounds, _ = _counts(quick)
    session = boto3.session.Session()
    with _temp_dir("signd-bench-kms-") as base, _moto_server(base) as moto_endpoint:
        server = start_kms_server_process(base / "kms-home", timeout=STARTUP_TIMEOUT)
        try:
            ours = _data_key_calls(server.client())
            moto = _data_key_calls(
                session.client(
                    "kms",
                    endpoint_url=moto_endpoint,
                    region_name="us-east-1",
                    aws_access_key_id="testing",
                    aws_secret_access_key="testing",  # noqa: S106 - moto's dummy credentials
                )
            )
            _progress.print(f"  {rounds} rounds of {requests} requests per operation and server")
            results = []
            for index, operation in enumerate(("GenerateDataKey", "Decrypt")):
                ours_rate, moto_rate = paired_rates(
                    ours[index], moto[index], iterations=requests, rounds=rounds
                )
                results.append(
                    BenchResult(
                        f"kms-server {operation} via boto3, sequential",
                        "req/s",
                        ours_rate,
                        f"moto_server {operation}",
                        moto_rate,
                        "≥ moto_server",
                    )
                )
            return results
        finally:
            server.stop()


def _enclave_home(base: Path, name: str, config: str) -> Path:
    home = base / name
    home.mkdir(mode=0o700)
    (home / "signd.toml").write_text(config)
    return home


@contextmanager
def _enclave(home: Path) -> Iterator[EnclaveClient]:
    enclave = EnclaveProcess(home)
    client = enclave.client()
    try:
        enclave.spawn()
        enclave.wait_until(client.health)
        yield client
    finally:
        client.close()
        enclave.stop()


@benchmark("kms-attestation-cold-sign")
def kms_attestation_cold_sign(quick: bool) -> list[BenchResult]:
    """Cold-sign p50 through the embedded kms-server, with Recipient vs attestation off."""
    _, _, samples = _counts(quick)
    with (
        _temp_dir("signd-bench-att-") as base,
        _enclave(_enclave_home(base, "attested", "")) as attested,
        _enclave(_enclave_home(base, "plain", '[enclave]\nattestation = "off"\n')) as plain,
    ):
        keys = {
            client: [key.reference for key in client.create_keys(CHAIN, 4)]
            for client in (attested, plain)
        }
        timings: dict[EnclaveClient, list[float]] = {attested: [], plain: []}
        _progress.print(f"  {samples} cold signatures each, interleaved")
        digest = b"\x42" * 32
        for i in range(samples):
            for client in (attested, plain):
                key = keys[client][i % 4]
                client.flush_cache()
                start = time.perf_counter()
                client.sign_digest(key, digest)
                timings[client].append(time.perf_counter() - start)
    return [
        BenchResult(
            "enclave cold sign p50 with Recipient (attested Decrypt, CMS answer)",
            "ms",
            statistics.median(timings[attested]) * 1000,
            "same, attestation off (plaintext Decrypt)",
            statistics.median(timings[plain]) * 1000,
            "reported (the cost attestation adds)",
            higher_is_better=False,
        )
    ]
