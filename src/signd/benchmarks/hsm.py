"""HSM signing through HsmBackend vs raw python-pkcs11, on a throwaway SoftHSM2 token.

Skips (returns no results) when SoftHSM2 is not installed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import coincurve
from pkcs11 import Mechanism, ObjectClass

from signd.benchmarks.harness import BenchResult, benchmark
from signd.crypto.hashing import keccak256
from signd.crypto.secret import Secret
from signd.custody.hsm import HsmBackend, HsmSettings
from signd.custody.hsm.library import Pkcs11Library
from signd.storage.sqlite import SqliteMetadataStore

SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
_TOKEN = "signd-bench"  # noqa: S105 - a token label
_THREADS = (1, 2, 4)


def _eth_address(public_key: bytes) -> str:
    return (
        "0x" + keccak256(coincurve.PublicKey(public_key).format(compressed=False)[1:])[-20:].hex()
    )


@contextmanager
def _softhsm_token(module: Path, pin: str) -> Iterator[Path]:
    """A temp token directory with one initialised token; SOFTHSM2_CONF points at it."""
    base = Path(tempfile.mkdtemp(prefix="signd-bench-hsm-"))
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {base / 'tokens'}\nlog.level = ERROR\n")
    saved = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        subprocess.run(
            [
                "softhsm2-util",
                "--init-token",
                "--free",
                "--label",
                _TOKEN,
                "--pin",
                pin,
                "--so-pin",
                pin,
            ],
            check=True,
            capture_output=True,
        )
        library = Pkcs11Library.load(module)
        library.reinitialize(library.generation)  # read this SOFTHSM2_CONF
        yield base
    finally:
        if saved is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = saved
        shutil.rmtree(base, ignore_errors=True)


def _threaded_rate(work: list[Callable[[], object]], iterations: int) -> float:
    """Calls per second of all ``work`` functions, each looping in its own thread."""
    start_line = threading.Barrier(len(work) + 1)

    def loop(fn: Callable[[], object]) -> None:
        start_line.wait()
        for _ in range(iterations):
            fn()

    threads = [threading.Thread(target=loop, args=(fn,)) for fn in work]
    for thread in threads:
        thread.start()
    start_line.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return len(work) * iterations / (time.perf_counter() - start)


@benchmark("hsm")
def hsm_signing(quick: bool) -> list[BenchResult]:
    """sign_digest vs raw CKM_ECDSA, with 1, 2 and 4 threads (sessions).

    signd's extra cost per signature is mostly ``normalize_signature``, which must verify the
    token's r‖s against the key and find its recovery id: one libsecp256k1 point
    multiplication (the nonce point R) plus a modular inverse. Against SoftHSM2's local
    ``C_Sign`` that is a visible fraction; against a networked HSM (a round trip per
    signature) it vanishes.
    """
    module = next((Path(p) for p in SOFTHSM_MODULES if Path(p).exists()), None)
    if module is None or shutil.which("softhsm2-util") is None:
        return []
    pin = secrets.token_hex(8)
    iterations, rounds = (150, 3) if quick else (600, 5)
    results = []
    with _softhsm_token(module, pin) as base:
        metadata = SqliteMetadataStore(base / "metadata.db")
        settings = HsmSettings(
            module_path=module, token_label=_TOKEN, pin=Secret(pin), pool_size=max(_THREADS)
        )
        backend = HsmBackend(settings, metadata)
        try:
            (key,) = backend.create_keys("ethereum", _eth_address)
            cka_id = bytes.fromhex(key.details["cka_id"])
            token = Pkcs11Library.load(module).lib.get_token(token_label=_TOKEN)
            sessions = [token.open() for _ in range(max(_THREADS))]
            raw_keys = [
                s.get_key(object_class=ObjectClass.PRIVATE_KEY, id=cka_id) for s in sessions
            ]
            digest = os.urandom(32)

            def ours() -> object:
                return backend.sign_digest(key, digest)

            for threads in _THREADS:
                ours_rates, base_rates = [], []
                raw_work: list[Callable[[], object]] = [
                    lambda k=k: k.sign(digest, mechanism=Mechanism.ECDSA)  # type: ignore[misc]
                    for k in raw_keys[:threads]
                ]
                for _ in range(rounds):
                    ours_rates.append(_threaded_rate([ours] * threads, iterations))
                    base_rates.append(_threaded_rate(raw_work, iterations))
                results.append(
                    BenchResult(
                        f"HSM sign_digest, {threads} thread(s), pool of {max(_THREADS)} (SoftHSM2)",
                        "sig/s",
                        statistics.median(ours_rates),
                        f"python-pkcs11 key.sign, {threads} session(s)",
                        statistics.median(base_rates),
                        "≥ 0.85×",
                    )
                )
            for session in sessions:
                session.close()
        finally:
            backend.close()
            metadata.close()
    return results
