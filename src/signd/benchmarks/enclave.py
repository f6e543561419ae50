"""Benchmarks of enclave custody against a real enclave process on a Unix socket.

Every figure starts ``python -m signd --home HOME enclave --listen unix://...`` as a child
process on a throwaway home (local KMS, filesystem blobs, SQLite metadata), as the local
deployment does, and stops it and removes the home when done.

The start-up figure fills a store with a million keys (100,000 with ``--quick``): real keys,
sealed by the enclave code and recorded through :class:`EnclaveBackend`, but created in this
process with the blob files written without fsync, on tmpfs when there is room (see
:func:`_store_parent`); what it times is a real enclave process from spawn to first signature.

``SIGND_BENCH_SIZE=tiny`` shrinks every size so that tests can run the benchmarks in seconds;
those figures mean nothing.
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import coincurve
from rich.console import Console

from signd.benchmarks.harness import BenchResult, benchmark, paired_rates
from signd.chains import address_deriver
from signd.custody.base import KeyInfo
from signd.custody.enclave import BLOB_DETAIL, EnclaveBackend
from signd.enclave.client import SIGNATURE_SIZE, EnclaveClient
from signd.enclave.protocol import MessageType
from signd.enclave.references import BlobRange
from signd.enclave.server import start_enclave
from signd.enclave.signer import EnclaveSigner
from signd.enclave.transport import InProcessTransport, UnixTransport
from signd.errors import DependencyUnavailable
from signd.kms.local import LocalKms
from signd.storage.blobs import FilesystemBlobStore
from signd.storage.sqlite import SqliteMetadataStore

SIZE_ENV: Final = "SIGND_BENCH_SIZE"
CHAIN: Final = "ethereum"
STARTUP_TIMEOUT: Final = 60.0
_POLL: Final = 0.005
_SIGN_TIMEOUT: Final = 60.0
_TMPFS_BYTES_PER_KEY: Final = 8 * 1024

_progress = Console(stderr=True)


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work each benchmark does."""

    single_keys: int
    batched_keys: int
    batch: int
    signing_keys: int
    signatures: int
    signing_rounds: int
    latency_samples: int
    stored_keys: int
    startup_rounds: int
    callers: int
    """Concurrent callers asking for one key each (what group commit serves)."""
    keygen_rounds: int


FULL: Final = Sizes(1000, 10_000, 1000, 16, 20_000, 7, 1000, 1_000_000, 5, 64, 3)
QUICK: Final = Sizes(200, 2000, 1000, 16, 5000, 5, 300, 100_000, 3, 64, 3)
TINY: Final = Sizes(5, 50, 25, 2, 50, 1, 10, 50, 1, 4, 1)


def sizes(quick: bool) -> Sizes:
    """The sizes for this run: tiny when ``SIGND_BENCH_SIZE=tiny``, else quick or full."""
    if os.environ.get(SIZE_ENV) == "tiny":
        return TINY
    return QUICK if quick else FULL


@contextmanager
def _temp_home(prefix: str, parent: Path | None = None) -> Iterator[Path]:
    """A throwaway home on the local (file-backed) KMS, which the in-process baselines share."""
    home = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    (home / "signd.toml").write_text('[kms]\ntype = "local"\n')
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


class EnclaveProcess:
    """``signd enclave`` as a child process on ``home``, listening on a socket inside it."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.socket_path = home / "run" / "enclave.sock"
        self.log_path = home / "run" / "enclave.log"
        self._process: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        """Start the process (do not wait for it to listen)."""
        self.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.socket_path.unlink(missing_ok=True)
        command = [
            sys.executable,
            "-m",
            "signd",
            "--home",
            str(self.home),
            "enclave",
            "--listen",
            f"unix://{self.socket_path}",
            "--exit-with-parent",
            "--allow-bare",  # measured through bare requests, without a gate
        ]
        environment = {k: v for k, v in os.environ.items() if not k.startswith("SIGND_")}
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=environment,
                start_new_session=True,
            )

    def client(self) -> EnclaveClient:
        return EnclaveClient(UnixTransport(str(self.socket_path)), timeout=_SIGN_TIMEOUT)

    def check_running(self) -> None:
        """Raise with the log's tail if the process has exited."""
        if self._process is not None and self._process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the enclave exited with {self._process.returncode}:\n{tail}")

    def wait_until(self, ready: Callable[[], object]) -> None:
        """Call ``ready`` until it stops raising DependencyUnavailable (the enclave is not up)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                ready()
                return
            except DependencyUnavailable:
                self.check_running()
                if time.monotonic() > deadline:
                    raise
                time.sleep(_POLL)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def _running_enclave(home: Path) -> Iterator[EnclaveClient]:
    """A client of a freshly started enclave process on ``home``; both closed on exit."""
    enclave = EnclaveProcess(home)
    client = enclave.client()
    try:
        enclave.spawn()
        enclave.wait_until(client.health)
        yield client
    finally:
        client.close()
        enclave.stop()


def _percentile(samples: list[float], percent: int) -> float:
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[percent - 1]


def _checked(signatures: list[Any]) -> None:
    """Fail loudly if any signature is missing or malformed (a fast wrong answer is no answer)."""
    bad = [s for s in signatures if not isinstance(s, bytes) or len(s) != SIGNATURE_SIZE]
    if bad:
        raise AssertionError(f"{len(bad)} of {len(signatures)} signatures failed: {bad[0]!r}")


def _check_stored(home: Path, metadata: SqliteMetadataStore, key: KeyInfo) -> None:
    """Fail loudly unless ``key`` is recorded and its sealed bytes are on disk."""
    where = BlobRange.parse(key.details[BLOB_DETAIL])
    if where is None:
        raise AssertionError("a new key's blob reference names no range of a batch blob")
    FilesystemBlobStore(home / "blobs").get_range(where.name, where.offset, where.length)
    if metadata.find(key.key_id) is None:
        raise AssertionError("the created keys were not recorded")


def _bare_keygen() -> bytes:
    """The baseline: a CSPRNG scalar and its public key, one EC multiplication, nothing kept."""
    return coincurve.PublicKey.from_valid_secret(os.urandom(32)).format(compressed=False)


@benchmark("enclave-keygen")
def enclave_keygen(quick: bool) -> list[BenchResult]:
    """Persisted address generation through the enclave process vs bare key generation.

    One key per request is measured twice: from one caller, request after request (nothing
    to group: each key waits for its own blob write and metadata commit), and from
    ``callers`` threads at once sharing one backend, as many wallet-layer callers asking for
    a deposit address each would (the enclave groups their blob writes, the host their
    metadata commits). Batches are ``batch`` keys per request, asked ahead of the host's
    checks. Each figure is the median of ``keygen_rounds`` rounds, alternating with rounds of
    the baseline.
    """
    size = sizes(quick)
    address_of = address_deriver(CHAIN)
    made: list[KeyInfo] = []

    def one_caller() -> None:
        for _ in range(size.single_keys):
            made.append(backend.create_keys(CHAIN, address_of, 1)[0])

    def many_callers() -> None:
        with ThreadPoolExecutor(size.callers) as pool:
            keys = list(
                pool.map(
                    lambda _: backend.create_keys(CHAIN, address_of, 1)[0],
                    range(size.single_keys),
                )
            )
        if len({key.key_id for key in keys}) != size.single_keys:
            raise AssertionError("concurrent callers did not each get their own key")
        made.extend(keys)

    def batched() -> None:
        made.extend(backend.create_keys(CHAIN, address_of, size.batched_keys))

    def baseline() -> None:
        for _ in range(size.batched_keys):
            _bare_keygen()

    figures: list[tuple[float, float]] = []
    with _temp_home("signd-bench-keygen-") as home, _running_enclave(home) as client:
        metadata = SqliteMetadataStore(home / "metadata.db")
        try:
            backend = EnclaveBackend(client, metadata, batch_size=size.batch)
            backend.create_keys(CHAIN, address_of, 1)
            for what, run, keys in (
                ("one per request, one caller", one_caller, size.single_keys),
                (f"one per request, {size.callers} callers", many_callers, size.single_keys),
                (f"{size.batch:,} per request", batched, size.batched_keys),
            ):
                _progress.print(f"  {size.keygen_rounds} rounds of {keys:,} keys {what}")
                ours, base = paired_rates(run, baseline, iterations=1, rounds=size.keygen_rounds)
                figures.append((ours * keys, base * size.batched_keys))
                _check_stored(home, metadata, made[-1])
                made.clear()
        finally:
            metadata.close()
    (single, single_base), (concurrent, concurrent_base), (batch, batch_base) = figures
    baseline_name = "bare keygen: os.urandom + coincurve from_valid_secret"
    return [
        BenchResult(
            "enclave address generation, 1 per request (1 caller; fs blobs + SQLite)",
            "keys/s",
            single,
            baseline_name,
            single_base,
            "reported: each key waits for its own 2 durable writes",
        ),
        BenchResult(
            f"enclave address generation, 1 per request, {size.callers} concurrent callers"
            " (fs blobs + SQLite)",
            "keys/s",
            concurrent,
            baseline_name,
            concurrent_base,
            "≥ 2,000 keys/s absolute",
        ),
        BenchResult(
            f"enclave address generation, {size.batch:,} per request (fs blobs + SQLite)",
            "keys/s",
            batch,
            baseline_name,
            batch_base,
            "≥ 10,000 keys/s absolute",
        ),
    ]


@benchmark("enclave-sign-warm")
def enclave_sign_warm(quick: bool) -> list[BenchResult]:
    """Warm signing over the Unix socket (pipelined, and batched) vs in-process EnclaveSigner."""
    size = sizes(quick)
    count = size.signatures
    with _temp_home("signd-bench-warm-") as home, _running_enclave(home) as client:
        keys = [key.reference for key in client.create_keys(CHAIN, size.signing_keys)]
        work = [(keys[i % len(keys)], secrets.token_bytes(32)) for i in range(count)]
        local = EnclaveSigner(LocalKms(home), FilesystemBlobStore(home / "blobs"))
        for key, digest in work[: len(keys)]:
            client.sign_digest(key, digest)
            local.sign_digest(key, digest)

        def pipelined() -> None:
            futures = [
                client.submit(MessageType.SIGN_DIGEST, {**key.to_body(), "digest": digest})
                for key, digest in work
            ]
            _checked([f.result(_SIGN_TIMEOUT).get("signature") for f in futures])

        def batched() -> None:
            futures: list[Future[dict[str, Any]]] = []
            for start in range(0, count, size.batch):
                items = [
                    {**key.to_body(), "digest": digest}
                    for key, digest in work[start : start + size.batch]
                ]
                futures.append(client.submit(MessageType.SIGN_DIGESTS, {"items": items}))
            results = [f.result(_SIGN_TIMEOUT)["results"] for f in futures]
            _checked([item.get("signature") for batch in results for item in batch])

        def in_process() -> None:
            for key, digest in work:
                local.sign_digest(key, digest)

        _progress.print(f"  {size.signing_rounds} rounds of {count:,} signatures each way")
        pipe_rounds, base_rounds = paired_rates(
            pipelined, in_process, iterations=1, rounds=size.signing_rounds
        )
        batch_rounds, base_rounds_2 = paired_rates(
            batched, in_process, iterations=1, rounds=size.signing_rounds
        )
    baseline = "EnclaveSigner.sign_digest in-process, warm"
    return [
        BenchResult(
            "enclave warm signing, pipelined SIGN_DIGEST over Unix socket",
            "sig/s",
            pipe_rounds * count,
            baseline,
            base_rounds * count,
            "≥ 10,000 sig/s absolute",
        ),
        BenchResult(
            f"enclave warm signing, SIGN_DIGESTS batches of {size.batch:,} over Unix socket",
            "sig/s",
            batch_rounds * count,
            baseline,
            base_rounds_2 * count,
            "≥ 10,000 sig/s absolute",
        ),
    ]


@benchmark("enclave-sign-cold")
def enclave_sign_cold(quick: bool) -> list[BenchResult]:
    """Signing latency with the enclave's cache flushed first vs warm, over the Unix socket."""
    size = sizes(quick)
    with _temp_home("signd-bench-cold-") as home, _running_enclave(home) as client:
        keys = [key.reference for key in client.create_keys(CHAIN, size.signing_keys)]
        for key in keys:
            client.sign_digest(key, secrets.token_bytes(32))
        warm: list[float] = []
        cold: list[float] = []
        _progress.print(f"  {size.latency_samples:,} warm and cold signatures")
        for i in range(size.latency_samples):
            key = keys[i % len(keys)]
            digest = secrets.token_bytes(32)
            client.sign_digest(key, digest)
            start = time.perf_counter()
            client.sign_digest(key, digest)
            warm.append(time.perf_counter() - start)
            client.flush_cache()
            start = time.perf_counter()
            client.sign_digest(key, digest)
            cold.append(time.perf_counter() - start)
    return [
        BenchResult(
            f"enclave cold signing {name} (blob read + KMS decrypt + unseal + sign)",
            "ms",
            _percentile(cold, percent) * 1000,
            f"warm signing {name}",
            _percentile(warm, percent) * 1000,
            target,
            higher_is_better=False,
        )
        for name, percent, target in (
            ("p50", 50, "p50 ≤ 2 ms"),
            ("p99", 99, "reported (no target)"),
        )
    ]


class _UnsyncedBlobStore(FilesystemBlobStore):
    """The filesystem store's layout without its fsyncs: only to fill a store for a benchmark."""

    def put(self, name: str, data: bytes) -> None:
        path = self.path_of(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("xb") as file:
            file.write(data)


def _store_parent(count: int) -> Path | None:
    """tmpfs for a large store when it has room, else the default temp folder (``None``).

    Creating a file costs far more on a disk file system than signd's key generation does, so
    a million blob files there take many minutes to write and to delete; on tmpfs they cost
    memory instead (a page per blob, about 5.5 GB for a million keys), returned at the end.
    tmpfs is used only when both it and free memory have twice that to spare.
    """
    shm = Path("/dev/shm")  # noqa: S108 - only a parent for mkdtemp, which makes a 0700 dir
    if count < 10_000 or not shm.is_dir():
        return None
    free_memory = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    room = min(shutil.disk_usage(shm).free, free_memory)
    return shm if room > 2 * _TMPFS_BYTES_PER_KEY * count else None


def _fill_store(home: Path, count: int) -> str:
    """Create ``count`` enclave keys on ``home`` in-process; the id of the middle one."""
    kms = LocalKms(home)
    server = start_enclave(None, kms, _UnsyncedBlobStore(home / "blobs"))
    client = EnclaveClient(InProcessTransport(server.serve_connection), timeout=_SIGN_TIMEOUT)
    metadata = SqliteMetadataStore(home / "metadata.db")
    address_of = address_deriver(CHAIN)
    chosen: KeyInfo | None = None
    try:
        backend = EnclaveBackend(client, metadata, batch_size=client.max_batch)
        chunk = 10_000
        report_every = max(count // 10, chunk)
        started = time.perf_counter()
        for done in range(0, count, chunk):
            created = backend.create_keys(CHAIN, address_of, min(chunk, count - done))
            if done <= count // 2 < done + len(created):
                chosen = created[count // 2 - done]
            stored = done + len(created)
            if stored % report_every < len(created):
                elapsed = time.perf_counter() - started
                _progress.print(f"  stored {stored:,} keys ({stored / elapsed:,.0f} keys/s)")
    finally:
        client.close()
        server.close()
        metadata.close()
    assert chosen is not None
    return chosen.key_id


def _startup_seconds(home: Path, key_id: str) -> float:
    """From spawning the enclave on ``home`` to the host's first signature with ``key_id``.

    The host side is as in production: the key is looked up in the metadata store (opened
    beforehand, as a running host has it) and the signature checked against its public key.
    """
    enclave = EnclaveProcess(home)
    client = enclave.client()
    metadata = SqliteMetadataStore(home / "metadata.db")
    backend = EnclaveBackend(client, metadata)
    digest = secrets.token_bytes(32)
    try:
        start = time.perf_counter()
        enclave.spawn()
        enclave.wait_until(lambda: backend.sign_digest(key_id, digest))
        return time.perf_counter() - start
    finally:
        client.close()
        metadata.close()
        enclave.stop()


@benchmark("enclave-startup")
def enclave_startup(quick: bool) -> list[BenchResult]:
    """Spawn-to-first-signature of an enclave over a large store vs over a one-key store."""
    size = sizes(quick)
    parent = _store_parent(size.stored_keys)
    where = "default temp folder" if parent is None else str(parent)
    with (
        _temp_home("signd-bench-startup-empty-", parent) as empty_home,
        _temp_home("signd-bench-startup-full-", parent) as full_home,
    ):
        empty_key = _fill_store(empty_home, 1)
        _progress.print(f"  filling a store with {size.stored_keys:,} keys in {where}")
        full_key = _fill_store(full_home, size.stored_keys)
        _startup_seconds(empty_home, empty_key)  # unmeasured: warms the OS's file caches
        empty: list[float] = []
        full: list[float] = []
        for _ in range(size.startup_rounds):
            empty.append(_startup_seconds(empty_home, empty_key))
            full.append(_startup_seconds(full_home, full_key))
        _progress.print("  removing the stores")
    return [
        BenchResult(
            f"enclave start-up to first signature, {size.stored_keys:,} stored keys"
            + ("" if parent is None else f" (stores on {parent})"),
            "s",
            statistics.median(full),
            "same with a one-key store",
            statistics.median(empty),
            "< 2 s and ratio ≈ 1.00×",
            higher_is_better=False,
        )
    ]
