"""The embedded default: signd starts its own enclave process and talks to it over a Unix socket.

On Nitro the enclave is a separate VM reached over vsock and configured by ``[enclave]
transport``; locally, with no transport configured, :class:`LocalEnclaveTransport` starts
``signd enclave`` as a child process on first use, restarts it if it has died, and stops it on
close. The child exits by itself if its parent dies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from signd.config import override_variables
from signd.enclave.client import EnclaveClient
from signd.enclave.protocol import CUSTODY_ENCLAVE
from signd.enclave.transport import SocketUnavailable, UnixTransport
from signd.errors import DependencyUnavailable, SigndError
from signd.secrets import HSM_PIN_ENV, KEYSTORE_PASSPHRASE_ENV, environment_only

log = logging.getLogger("signd.enclave.local")

STARTUP_TIMEOUT = 20.0
REAP_TIMEOUT = 1.0
"""How long a refused connection waits for a killed child to be reaped before restarting."""
LOG_FILE_NAME = "enclave.log"
HANG_TIMEOUT = 30.0
"""Seconds a live enclave process may go without answering before it is replaced."""
MAX_PROBE_INTERVAL = 5.0

BASE_ENVIRONMENT: Final = frozenset({"PATH", "HOME", "LANG", "TZ", "TMPDIR", "LD_LIBRARY_PATH"})
BASE_ENVIRONMENT_PREFIXES: Final = ("LC_", "PYTHON")
"""What every local enclave process gets of its host's environment: the interpreter's own
variables and what the dynamic loader needs to start it and load a PKCS#11 module, the
locale, the time zone and where temporary files go."""
ENCLAVE_SECTIONS: Final = ("enclave", "kms", "blobs", "hsm")
"""The config tables the enclave process reads: their ``SIGND_<SECTION>_<KEY>`` overrides
reach it (they never hold a secret; the host's tables, such as ``[metadata] dsn``, stay out)."""
HSM_MODULE_ENVIRONMENT: Final = frozenset({"SOFTHSM2_CONF"})
"""What a PKCS#11 module that signd knows of reads, for an enclave that holds HSM custody
(others: ``[enclave] pass_environment``)."""
AWS_ENVIRONMENT_PREFIXES: Final = ("AWS_",)
PROXY_ENVIRONMENT: Final = frozenset(
    {"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"}
)
"""With AWS_*, what boto3 reads, for an enclave that reaches AWS with the host's credentials."""
_HSM_SECRETS: Final = frozenset({"hsm.pin"})
"""The secret settings that an enclave holding HSM custody reads."""


@dataclass(frozen=True, slots=True)
class EnclaveEnvironment:
    """Which of the host's environment variables a local enclave process gets: an allowlist,
    so that no secret of the host's, whatever its variable's name, reaches the enclave's
    ``/proc/<pid>/environ`` unless the enclave reads it.

    - always: :data:`BASE_ENVIRONMENT` and its prefixes, and the ``SIGND_<SECTION>_<KEY>``
      overrides of :data:`ENCLAVE_SECTIONS`;
    - with ``hsm_in_enclave``: ``SIGND_HSM_PIN``, the variable ``[hsm] pin = "env:NAME"``
      names, and :data:`HSM_MODULE_ENVIRONMENT`;
    - with ``uses_aws`` (its KMS, blob store or HSM PIN is an AWS service reached with the
      default credentials): ``AWS_*`` and :data:`PROXY_ENVIRONMENT`;
    - the names in ``passed`` (``[enclave] pass_environment``).

    Never, even when listed: the keystore passphrase, ``SIGND_HSM_PIN`` without
    ``hsm_in_enclave``, and a variable an ``env:`` reference names (``secret_references``,
    setting -> variable) for a secret the enclave does not read.
    """

    hsm_in_enclave: bool = False
    uses_aws: bool = False
    secret_references: Mapping[str, str] = field(default_factory=dict)
    passed: frozenset[str] = frozenset()

    def of(self, environ: Mapping[str, str]) -> dict[str, str]:
        """The environment for an enclave process started from ``environ``."""
        used = _HSM_SECRETS if self.hsm_in_enclave else frozenset()
        needed = {name for setting, name in self.secret_references.items() if setting in used}
        names = {*BASE_ENVIRONMENT, *self.passed, *override_variables(ENCLAVE_SECTIONS, environ)}
        prefixes: tuple[str, ...] = BASE_ENVIRONMENT_PREFIXES
        if self.hsm_in_enclave:
            names |= {HSM_PIN_ENV, *HSM_MODULE_ENVIRONMENT, *needed}
        if self.uses_aws:
            names |= PROXY_ENVIRONMENT
            prefixes += AWS_ENVIRONMENT_PREFIXES
        withheld = {KEYSTORE_PASSPHRASE_ENV, *self.secret_references.values()} - needed
        if not self.hsm_in_enclave:
            withheld.add(HSM_PIN_ENV)
        chosen = environment_only(names, prefixes, environ)
        return {name: value for name, value in chosen.items() if name not in withheld}


class LocalEnclaveTransport:
    """A Unix-socket transport whose enclave process is started on demand.

    The process is started ``--gate-only`` (its keys sign only through its gate) when
    ``gate_only``, as ``signd serve`` wants it, and ``--allow-bare`` otherwise: the operator's
    own commands (``signd keys new``, ``signd sign``) send bare requests.

    A watchdog thread probes the running process (a HELLO on a connection of its own, which
    needs none of the enclave's dependencies). A process that is alive but has answered no
    probe for ``hang_timeout`` seconds (stopped, deadlocked, spinning) is killed, so that the
    next call starts a new one, as after a crash. ``hang_timeout = 0`` turns this off.

    The process gets only the variables of this process's environment that ``environment``
    allows (by default: no HSM, no AWS, nothing passed), read at each start.
    """

    def __init__(
        self,
        home: Path,
        *,
        startup_timeout: float = STARTUP_TIMEOUT,
        hang_timeout: float = HANG_TIMEOUT,
        gate_only: bool = False,
        environment: EnclaveEnvironment | None = None,
    ) -> None:
        if hang_timeout < 0:
            raise ValueError("hang_timeout must not be negative")
        self._home = home
        self._startup_timeout = startup_timeout
        self._hang_timeout = hang_timeout
        self._gate_only = gate_only
        self._environment = environment if environment is not None else EnclaveEnvironment()
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._starting = False
        """Whether a process is being started (its silence is the start-up timeout's)."""
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
        except SocketUnavailable:
            raise  # this process is short of descriptors: the enclave may be fine
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
            "--gate-only" if self._gate_only else "--allow-bare",
        ]
        with log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                env=self._environment.of(os.environ),
            )
        self._watch()
        self._starting = True
        try:
            self._wait_for_start(self._process, log_path)
        finally:
            self._starting = False

    def _wait_for_start(self, process: subprocess.Popen[bytes], log_path: Path) -> None:
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise DependencyUnavailable(
                    f"the local enclave process exited with status {process.returncode};"
                    f" see {log_path}"
                )
            if self._socket_path.exists():
                try:
                    self._inner.connect(1.0).close()
                    return
                except DependencyUnavailable:
                    pass
            time.sleep(0.05)
        self._end(process)
        raise DependencyUnavailable(f"the local enclave did not start in time; see {log_path}")

    def _watch(self) -> None:
        """Start the watchdog (once; it runs until :meth:`stop`)."""
        if self._hang_timeout and self._watchdog is None:
            self._watchdog = threading.Thread(
                target=self._watch_for_hangs, name="signd-enclave-watchdog", daemon=True
            )
            self._watchdog.start()

    def _watch_for_hangs(self) -> None:
        interval = min(MAX_PROBE_INTERVAL, self._hang_timeout / 3)
        watched: subprocess.Popen[bytes] | None = None
        answered = time.monotonic()
        while not self._stopping.wait(interval):
            process = self._process
            if process is not watched or self._starting:  # its time starts when it is up
                watched, answered = process, time.monotonic()
            if process is None or self._starting or process.poll() is not None:
                continue
            try:
                answers = self._answers(interval)
            except SocketUnavailable as exc:  # not asked: no sign that it hangs
                log.warning("could not ask the local enclave whether it answers: %s", exc.message)
                answers = True
            if answers:
                answered = time.monotonic()
            elif time.monotonic() - answered >= self._hang_timeout:
                self._replace_hung(process, time.monotonic() - answered)

    def _answers(self, timeout: float) -> bool:
        """Whether the enclave answers a HELLO on a new connection within ``timeout``;
        :class:`SocketUnavailable` when this process could not make the connection."""
        probe = EnclaveClient(self._inner, timeout=timeout, connect_timeout=timeout)
        try:
            probe.require_custody(CUSTODY_ENCLAVE)
            return True
        except SocketUnavailable:
            raise
        except SigndError:
            return False
        finally:
            probe.close()

    def _replace_hung(self, process: subprocess.Popen[bytes], silent_for: float) -> None:
        """Kill ``process`` if it is still the current one; the next call starts another."""
        with self._lock:
            if process is not self._process or process.poll() is not None:
                return
            log.error(
                "the local enclave process (pid %d) has not answered for %.0f s; replacing it",
                process.pid,
                silent_for,
            )
            process.kill()
            process.wait()

    def stop(self) -> None:
        """Stop the child process (if running) and remove its socket directory."""
        self._stopping.set()
        with self._lock:
            process, self._process = self._process, None
        if process is not None:
            self._end(process)
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    @staticmethod
    def _end(process: subprocess.Popen[bytes]) -> None:
        """Terminate ``process`` (killed if it has not ended within 10 s); one stopped
        (SIGSTOP) is continued, so that it acts on the SIGTERM rather than waiting out the 10 s."""
        if process.poll() is None:
            process.terminate()
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGCONT)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

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
