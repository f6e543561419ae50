"""Helpers for tests that run signd against real dependencies and real processes.

- :func:`write_config` writes a ``signd.toml`` from plain tables;
- :func:`local_tables` / :func:`aws_tables` are the two storage stacks: {LocalKms, filesystem
  blobs, SQLite} and {AWS KMS, S3, PostgreSQL} against moto_server and a real PostgreSQL;
- :class:`SigndProcess` runs ``python -m signd ...`` (an enclave, a proxy) with a readiness
  check, a log file and a bounded stop;
- :func:`core_file_limits` reads a process's core file size limits;
- :func:`record_children` records the command and environment of each process a test starts;
- :func:`records_with_missing_blobs` checks the invariant that no recorded key lacks its blob.

Every wait here is bounded in time and every process is stopped by whoever started it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from signd.enclave.client import EnclaveClient
from signd.enclave.references import BlobRange
from signd.enclave.transport import UnixTransport
from signd.errors import DependencyUnavailable, KeyNotFound
from signd.storage.base import BlobStore, KeyRecord, MetadataStore

REPO = Path(__file__).resolve().parents[2]
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
}
Tables = dict[str, dict[str, Any]]


# --------------------------------------------------------------------------- configuration


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def write_config(home: Path, tables: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write ``home/signd.toml`` holding ``tables`` (flat tables of simple values)."""
    home.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
        lines.append("")
    path = home / "signd.toml"
    path.write_text("\n".join(lines))
    return path


def local_tables() -> Tables:
    """One node's embedded stack: LocalKms, filesystem blobs, SQLite."""
    return {
        "kms": {"type": "local"},
        "blobs": {"type": "filesystem", "path": "{home}/blobs"},
        "metadata": {"type": "sqlite", "path": "{home}/metadata.db"},
    }


def aws_tables(
    *,
    kms_endpoint: str,
    key_id: str,
    s3_endpoint: str,
    bucket: str,
    dsn: str,
    timeout: float = 2.0,
) -> Tables:
    """The several-nodes stack: AWS KMS, S3 and PostgreSQL, with short timeouts for tests."""
    return {
        "kms": {
            "type": "aws",
            "key_id": key_id,
            "region": "us-east-1",
            "endpoint_url": kms_endpoint,
            "connect_timeout": timeout,
            "read_timeout": timeout,
            "max_attempts": 1,
        },
        "blobs": {
            "type": "s3",
            "bucket": bucket,
            "prefix": "signd/",
            "region": "us-east-1",
            "endpoint_url": s3_endpoint,
            "timeout": timeout,
            "max_attempts": 1,
        },
        "metadata": {"type": "postgres", "dsn": dsn, "timeout": timeout},
    }


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment without any ``SIGND_*`` overrides, with dummy AWS credentials."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("SIGND_")}
    env.pop("AWS_PROFILE", None)
    env.update(AWS_ENV)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


@contextlib.contextmanager
def short_dir() -> Iterator[Path]:
    """A short folder under /tmp for Unix sockets (their paths are limited to ~107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="signd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- processes


def wait_until(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Poll ``predicate`` every 50 ms until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


class SigndProcess:
    """``python -m signd --home HOME ARGS...`` as a subprocess, its output in ``log``."""

    def __init__(self, home: Path, *args: str, log: Path, env: Mapping[str, str]) -> None:
        self.home = home
        self.args = args
        self.log = log
        self.env = dict(env)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        process = self.process
        return process.pid if process is not None and process.poll() is None else None

    def start(self, ready: Callable[[], bool], *, timeout: float = 30.0) -> None:
        """Start and wait until ``ready()``; fail (showing the log) if it exits first."""
        command = [sys.executable, "-m", "signd", "--home", str(self.home), *self.args]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        process = self.process

        def up() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"{self.args[0]} exited early:\n{self.log.read_text()}")
            return ready()

        try:
            wait_until(up, timeout=timeout, what=f"signd {' '.join(self.args)}")
        except BaseException:
            self.stop()
            raise

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as if the machine lost the process."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def enclave_answers(socket_path: Path) -> bool:
    """True once an enclave on ``socket_path`` completes a request (one touching no dependency)."""
    client = EnclaveClient(UnixTransport(str(socket_path)), timeout=2.0, connect_timeout=0.5)
    try:
        client.flush_cache()
    except DependencyUnavailable:
        return False
    finally:
        client.close()
    return True


def enclave_process(home: Path, socket_path: Path, *, env: Mapping[str, str]) -> SigndProcess:
    """A ``signd enclave`` node listening on ``socket_path`` (not yet started)."""
    return SigndProcess(
        home,
        "enclave",
        "--listen",
        f"unix://{socket_path}",
        "--allow-bare",  # the tests' host signs with bare requests, as operator tools do
        log=home / "enclave.log",
        env=env,
    )


def start_enclave_process(process: SigndProcess, socket_path: Path) -> None:
    process.start(lambda: enclave_answers(socket_path))


def child_pids(parent: int, *, containing: str | tuple[str, ...]) -> list[int]:
    """Live children of ``parent`` whose command line contains ``containing`` (each of them,
    for a tuple)."""
    wanted = (containing,) if isinstance(containing, str) else containing
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent and fields[0] != "Z" and all(w in command for w in wanted):
            found.append(int(stat.parent.name))
    return found


def process_environment(pid: int) -> dict[str, str] | None:
    """``/proc/<pid>/environ``; None unless root (signd's child processes are non-dumpable,
    so only root may read it)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except PermissionError:
        return None
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {name.decode(): value.decode() for name, _, value in pairs}


def core_file_limits(pid: int) -> list[str]:
    """The soft and hard core file size limits of process ``pid``, as ``/proc`` shows them."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            return line.split()[4:6]
    raise AssertionError(f"/proc/{pid}/limits has no core file size")


@dataclass(frozen=True)
class StartedChild:
    command: list[str]
    environment: dict[str, str]


def record_children(monkeypatch: pytest.MonkeyPatch) -> list[StartedChild]:
    """The command and environment of each process that this one starts from now on.

    A child's ``/proc/<pid>/environ`` is no way to see them: once the child has made itself
    non-dumpable (:mod:`signd.hardening`), only root may read it.
    """
    started: list[StartedChild] = []

    class RecordingPopen(subprocess.Popen):  # type: ignore[type-arg]
        def __init__(self, args: Sequence[str], *rest: Any, **options: Any) -> None:
            environment = options.get("env")
            started.append(
                StartedChild(
                    [str(arg) for arg in args],
                    dict(os.environ if environment is None else environment),
                )
            )
            super().__init__(args, *rest, **options)

    monkeypatch.setattr(subprocess, "Popen", RecordingPopen)
    return started


# --------------------------------------------------------------------------- invariants


def all_records(metadata: MetadataStore, *, custody: str = "enclave") -> list[KeyRecord]:
    """Every record of a custody, paging through the store (bounded)."""
    records: list[KeyRecord] = []
    cursor: str | None = None
    for _ in range(10_000):
        page = metadata.list(custody=custody, cursor=cursor, limit=100)
        records.extend(page.records)
        cursor = page.next_cursor
        if cursor is None:
            return records
    raise AssertionError("the metadata store never ran out of pages")


def records_with_missing_blobs(metadata: MetadataStore, blobs: BlobStore) -> list[str]:
    """Key ids whose record names a blob, or a range of a batch blob, that is not stored.

    Must always be empty. A ranged reference (``<batch blob>@<offset>+<length>``) counts as
    stored only when the batch blob holds all of its bytes.
    """
    missing = []
    for record in all_records(metadata):
        reference = dict(record.details)["blob"]
        where = BlobRange.parse(reference)
        try:
            if where is None:
                blobs.get(reference)
            else:
                blobs.get_range(where.name, where.offset, where.length)
        except KeyNotFound:
            missing.append(record.key_id)
    return missing
