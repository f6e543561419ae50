"""Throughput floors: address generation, unlock cost, and the signing hot path."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import coincurve
import pytest

from signd.crypto.secret import Secret
from signd.custody.keystore import KeystoreBackend
from tests.custody.keystore.conftest import eth_address, open_keystore

pytestmark = pytest.mark.slow

KEY = bytes.fromhex("4646464646464646464646464646464646464646464646464646464646464646")


def test_create_keys_rate_and_open_time(keystore_path: Path) -> None:
    reported: list[int] = []
    with open_keystore(keystore_path) as keystore:
        started = time.perf_counter()
        keys = keystore.create_keys("ethereum", eth_address, count=10_000, progress=reported.append)
        elapsed = time.perf_counter() - started
    assert len({k.address for k in keys}) == 10_000
    assert reported[-1] == 10_000
    assert 10 <= len(reported) <= 100
    assert 10_000 / elapsed >= 2_000, f"{10_000 / elapsed:.0f} keys/s"
    started = time.perf_counter()
    with open_keystore(keystore_path, create=False) as keystore:
        opened = time.perf_counter() - started
        assert keystore.find_key(keys[-1].address) == keys[-1]
    assert opened < 1.0


def test_sign_digest_is_close_to_raw_libsecp256k1(keystore: KeystoreBackend) -> None:
    info = keystore.import_private_key("ethereum", Secret(KEY), eth_address)
    raw_key = coincurve.PrivateKey(keystore.export_private_key_unsafe(info.key_id).reveal_bytes())
    digest = os.urandom(32)
    rounds = 3000

    def best_of(run: Callable[[], object]) -> float:
        times = []
        for _ in range(5):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        return min(times)

    raw = best_of(lambda: [raw_key.sign_recoverable(digest, hasher=None) for _ in range(rounds)])
    ours = best_of(lambda: [keystore.sign_digest(info, digest) for _ in range(rounds)])
    assert raw / ours >= 0.8, f"{raw / ours:.2f}x raw speed"
