"""Benchmarks of the signing core, the Ethereum encoder and the keystore."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import coincurve

from signd.benchmarks.harness import BenchResult, benchmark, paired_rates, rate
from signd.chains import address_deriver
from signd.crypto.secret import Secret
from signd.custody.keystore import KeystoreBackend, ScryptParams
from signd.operations.signer import Signer

_PASSPHRASE = Secret("benchmark passphrase")
_CHEAP_KDF = ScryptParams(n=2**14)


def _keystore(path: Path, kdf: ScryptParams = _CHEAP_KDF) -> KeystoreBackend:
    return KeystoreBackend.open(path, _PASSPHRASE, create=True, kdf_params=kdf)


@benchmark("sign-digest")
def sign_digest(quick: bool) -> list[BenchResult]:
    """sign_digest through the custody interface vs raw coincurve sign_recoverable."""
    with tempfile.TemporaryDirectory() as tmp:
        backend = _keystore(Path(tmp) / "wallet.data")
        (key,) = backend.create_keys("ethereum", address_deriver("ethereum"), 1)
        digest = os.urandom(32)
        backend.sign_digest(key, digest)
        raw_key = coincurve.PrivateKey()
        ours, base = paired_rates(
            lambda: backend.sign_digest(key, digest),
            lambda: raw_key.sign_recoverable(digest, hasher=None),
            iterations=1000 if quick else 5000,
        )
        backend.close()
    return [
        BenchResult(
            "sign-digest (keystore, custody interface)",
            "sig/s",
            ours,
            "coincurve sign_recoverable",
            base,
            "≥ 0.80×",
        )
    ]


@benchmark("eth-tx")
def eth_transaction(quick: bool) -> list[BenchResult]:
    """EIP-1559 signing through signd's Signer vs eth-account's Account.sign_transaction."""
    from eth_account import Account

    with tempfile.TemporaryDirectory() as tmp:
        backend = _keystore(Path(tmp) / "wallet.data")
        (key,) = backend.create_keys("ethereum", address_deriver("ethereum"), 1)
        secret = backend.export_private_key_unsafe(key.key_id).reveal_bytes()
        signer = Signer({"keystore": lambda: backend})
        tx = {
            "type": 2,
            "chainId": 1,
            "nonce": 7,
            "to": "0x3535353535353535353535353535353535353535",
            "value": 10**18,
            "gas": 21000,
            "maxFeePerGas": 40 * 10**9,
            "maxPriorityFeePerGas": 2 * 10**9,
            "data": "0x",
        }
        ours_raw = signer.sign_eth_transaction(key.key_id, tx).raw
        theirs = Account.sign_transaction(tx, secret)
        if bytes(theirs.raw_transaction) != ours_raw:
            raise AssertionError("eth-account and signd disagree on the benchmark transaction")
        ours, base = paired_rates(
            lambda: signer.sign_eth_transaction(key.key_id, tx),
            lambda: Account.sign_transaction(tx, secret),
            iterations=200 if quick else 1000,
        )
        signer.close()
    return [
        BenchResult(
            "EIP-1559 tx sign (Signer, keystore)",
            "tx/s",
            ours,
            "eth-account sign_transaction",
            base,
            "≥ 2.00×",
        )
    ]


@benchmark("keystore-keygen")
def keystore_keygen(quick: bool) -> list[BenchResult]:
    """Persisted HD address generation vs bare coincurve key generation + public key."""
    count = 2000 if quick else 10000
    with tempfile.TemporaryDirectory() as tmp:
        backend = _keystore(Path(tmp) / "wallet.data")
        address_of = address_deriver("ethereum")
        backend.create_keys("ethereum", address_of, 1)
        start = time.perf_counter()
        backend.create_keys("ethereum", address_of, count)
        ours = count / (time.perf_counter() - start)
        backend.close()
    base = rate(
        lambda: coincurve.PrivateKey().public_key.format(compressed=False),
        iterations=count // 5,
    )
    return [
        BenchResult(
            "keystore address generation (HD, persisted)",
            "keys/s",
            ours,
            "coincurve keygen + pubkey",
            base,
            "≥ 2,000 keys/s absolute",
        )
    ]


@benchmark("keystore-unlock")
def keystore_unlock(quick: bool) -> list[BenchResult]:
    """Unlock time of a large keystore vs a one-key keystore (same KDF): count-independent."""
    count = 20_000 if quick else 100_000
    kdf = ScryptParams(n=2**17)
    with tempfile.TemporaryDirectory() as tmp:
        small, large = Path(tmp) / "small.data", Path(tmp) / "large.data"
        address_of = address_deriver("ethereum")
        with _keystore(small, kdf) as backend:
            backend.create_keys("ethereum", address_of, 1)
        with _keystore(large, kdf) as backend:
            for _ in range(count // 10_000 or 1):
                backend.create_keys("ethereum", address_of, min(count, 10_000))

        def unlock_seconds(path: Path) -> float:
            times = []
            for _ in range(5):
                start = time.perf_counter()
                KeystoreBackend.open(path, _PASSPHRASE, create=False).close()
                times.append(time.perf_counter() - start)
            return min(times)

        small_s, large_s = unlock_seconds(small), unlock_seconds(large)
    return [
        BenchResult(
            f"keystore unlock, {count:,} keys (scrypt n=2^17)",
            "s",
            large_s,
            "unlock of a 1-key keystore",
            small_s,
            "< 1 s and ratio ≈ 1.00×",
            higher_is_better=False,
        )
    ]
