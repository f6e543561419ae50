"""HSM custody under load in a child process, while a test puts the token through a fault.

The child (:data:`LOAD_SCRIPT`) keeps ``creators`` threads creating keys and ``signers``
threads signing, counts each call's outcome by phase (``"{phase} create ok"``, ``"{phase}
sign dependency_unavailable"``, ...), and once told ``after`` creates and signs once more and
prints the counts. A child, so that a crash of the module (SIGSEGV) is an exit status rather
than the end of the test run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.custody.hsm.conftest import USER_PIN, SoftHsm

LOAD_SCRIPT = """
import collections, os, sys, threading
from pathlib import Path
from signd.chains import address_deriver
from signd.crypto.secret import Secret
from signd.custody.hsm import HsmBackend, HsmSettings
from signd.errors import SigndError
from signd.storage.sqlite import SqliteMetadataStore

module, label, pin, database = sys.argv[1:5]
creators, signers = int(sys.argv[5]), int(sys.argv[6])
settings = HsmSettings(
    module_path=Path(module), token_label=label, pin=Secret(pin), pool_size=4,
    reconnect_interval=0,
)
backend = HsmBackend(settings, SqliteMetadataStore(Path(database)))
address_of = address_deriver("ethereum")
keys = backend.create_keys("ethereum", address_of, max(signers, 2))
phase, stop, lock = ["before"], threading.Event(), threading.Lock()
counts = collections.Counter()

def work(index, creating):
    while not stop.is_set():
        during, what = phase[0], "create" if creating else "sign"
        try:
            if creating:
                backend.create_keys("ethereum", address_of)
            else:
                backend.sign_digest(keys[index % len(keys)], os.urandom(32))
            outcome = "ok"
        except SigndError as exc:
            outcome = exc.code
        except Exception as exc:
            outcome = "unexpected " + type(exc).__name__
        with lock:
            counts[f"{during} {what} {outcome}"] += 1

threads = [threading.Thread(target=work, args=(i, True)) for i in range(creators)]
threads += [threading.Thread(target=work, args=(i, False)) for i in range(signers)]
for thread in threads:
    thread.start()
print("loaded", flush=True)
for line in sys.stdin:
    phase[0] = line.strip()
    if phase[0] == "after":
        break
stop.set()
for thread in threads:
    thread.join()
(fresh,) = backend.create_keys("ethereum", address_of)
for key in [*keys, fresh]:
    backend.sign_digest(key, os.urandom(32))
backend.close()
print(dict(counts), flush=True)
"""


@dataclass(frozen=True, slots=True)
class LoadRun:
    """How the child ended: its exit status, its counts (empty if it printed none), stderr."""

    returncode: int
    counts: dict[str, int]
    stderr: str


def run_under_load(
    softhsm: SoftHsm,
    label: str,
    database: Path,
    *,
    creators: int,
    signers: int,
    fault: Callable[[Callable[[str], None]], None],
) -> LoadRun:
    """Load the token ``label`` from a child process and call ``fault(say)`` once it is
    loaded: ``say(phase)`` names the phase the child counts outcomes under from then on.
    ``after`` is said when ``fault`` returns; the child then checks it can create and sign."""
    child = subprocess.Popen(
        [
            *(sys.executable, "-c", LOAD_SCRIPT, str(softhsm.module), label, USER_PIN),
            *(str(database), str(creators), str(signers)),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    stdin = child.stdin

    def say(phase: str) -> None:
        stdin.write(phase + "\n")
        stdin.flush()

    try:
        assert child.stdout.readline().strip() == "loaded"
        fault(say)
        say("after")
        out, err = child.communicate(timeout=60)
    except (BrokenPipeError, subprocess.TimeoutExpired):
        child.kill()
        out, err = child.communicate()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    counts = ast.literal_eval(out.strip()) if out.strip() else {}
    return LoadRun(child.returncode, counts, err)
