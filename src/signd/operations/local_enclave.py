"""The embedded default: signd starts its own enclave process and talks to it over a Unix socket.

On Nitro the enclave is a separate VM reached over vsock and configured by ``[enclave]
transport``; locally, with no transport configured, :class:`LocalEnclaveTransport` starts
``signd enclave`` as a child process on first use, restarts it if it has died, and stops it on
close. The child exits by itself if its parent dies.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from signd.enclave.transport import UnixTransport
from signd.errors import DependencyUnavailable

STARTUP_TIMEOUT = 20.0
REAP_TIMEOUT = 1.0
"""How long a refused connection waits for a killed child to be reaped before restarting."""
LOG_FILE_NAME = "enclave.log"


class LocalEnclaveTransport:
    """A Unix-socket transport whose enclave process is started on demand."""

    def __init__(self, home: Path, *, startup_timeout: float = STARTUP_TIMEOUT) -> None:
        self._home = home
        self._startup_timeout = startup_timeout
        self._socket_dir = Path(tempfile.mkdtemp(prefix="signd-enclave-"))
        self._socket_path = self._socket_dir / "enclave.sock"
        self._inner = UnixTransport(str(self._socket_path))
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"unix://{self._socket_path}"

    def __repr__(self) -> str:
        return f"LocalEnclaveTransport({self.address})"

    def connect(self, timeout: float) -> socket.socket:
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._start()
        try:
            return self._inner.connect(timeout)
        except DependencyUnavailable:
            if not self._restart_if_dead():
                raise
        return self._inner.connect(timeout)

    def _restart_if_dead(self) -> bool:
        """After a refused connection: if the child is dead or dying, start a new one."""
        with self._lock:
            process = self._process
            if process is not None:
                try:
                    process.wait(timeout=REAP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    return False
            self._start()
            return True

    def _start(self) -> None:
        log_path = self._home / "run" / LOG_FILE_NAME
        log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        command = [
            sys.executable,
            "-m",
            "signd",
            "--home",
            str(self._home),
            "enclave",
            "--listen",
            self.address,
            "--exit-with-parent",
        ]
        with log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise DependencyUnavailable(
                    f"the local enclave process exited with status {self._process.returncode};"
                    f" see {log_path}"
                )
            if self._socket_path.exists():
                try:
                    self._inner.connect(1.0).close()
                    return
                except DependencyUnavailable:
                    pass
            time.sleep(0.05)
        self.stop()
        raise DependencyUnavailable(f"the local enclave did not start in time; see {log_path}")

    def stop(self) -> None:
        """Stop the child process (if running) and remove its socket directory."""
        with self._lock:
            process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.poll() is None else None


def watch_parent(stop: threading.Event, interval: float = 1.0) -> threading.Thread:
    """Set ``stop`` when the process that started us goes away (we get re-parented)."""
    parent = os.getppid()

    def watch() -> None:
        while not stop.wait(interval):
            if os.getppid() != parent:
                stop.set()

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread
