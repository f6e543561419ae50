"""The enclave application: envelope encryption, the attacks on it, and failing dependencies."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import coincurve
import pytest
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from signd.chains import address_deriver
from signd.crypto.secp256k1 import RecoverableSignature, recover_public_key
from signd.crypto.secret import Secret
from signd.enclave import signer as enclave_signer
from signd.enclave.cache import UnsealedKeyCache
from signd.enclave.protocol import CreatedKey, KeyReference
from signd.enclave.sealing import SealedKey
from signd.enclave.signer import ENCRYPTION_CONTEXT, EnclaveSigner
from signd.errors import (
    DependencyUnavailable,
    IntegrityError,
    InvalidField,
    KeyNotFound,
)
from signd.kms.local import LocalKms
from signd.storage.blobs import FilesystemBlobStore
from tests.enclave.batch_blobs import range_of, read_sealed, replace_sealed, swap_sealed
from tests.enclave.fakes import (
    ForgingKms,
    MemoryBlobStore,
    MemoryKms,
    SlowBlobStore,
    unseal_in_test,
)

DIGEST = bytes(range(32))
eth_address = address_deriver("ethereum")


@pytest.fixture
def signer(kms: MemoryKms, blobs: MemoryBlobStore) -> EnclaveSigner:
    return EnclaveSigner(kms, blobs)


def test_created_keys_are_sealed_under_a_round_tripped_data_key(
    signer: EnclaveSigner, kms: MemoryKms, blobs: MemoryBlobStore
) -> None:
    [key] = signer.create_keys("ethereum", 1)
    assert kms.generated == 1
    assert kms.decrypted == 1
    assert kms.contexts == [{"service": "signd", "purpose": "enclave-sealed-key"}]
    assert key.chain == "ethereum"
    assert key.address == eth_address(key.public_key)
    blob = read_sealed(blobs, key.blob)
    body = cbor2.loads(blob)
    assert cbor2.dumps(body, canonical=True) == blob
    assert body["format"] == "signd.enclave.sealed-key"
    assert body["version"] == 2
    assert body["algorithm"] == "AES-256-GCM"
    assert body["kms_key_id"] == "memory-key-1"
    assert set(body) == {
        "format",
        "version",
        "algorithm",
        "kms_key_id",
        "encrypted_data_key",
        "nonce",
        "encrypted_private_key",
    }
    secret = unseal_in_test(kms, blob, key)
    assert coincurve.PrivateKey(secret).public_key.format() == key.public_key
    assert secret not in blob
    data_key = kms.decrypt(body["encrypted_data_key"], encryption_context=ENCRYPTION_CONTEXT)
    assert data_key.reveal_bytes() not in blob


def test_a_batch_shares_one_data_key_with_a_nonce_per_key(
    signer: EnclaveSigner, kms: MemoryKms, blobs: MemoryBlobStore
) -> None:
    keys = signer.create_keys("ethereum", 20)
    assert kms.generated == 1
    assert blobs.puts == 1
    sealed = [SealedKey.from_bytes(read_sealed(blobs, k.blob)) for k in keys]
    assert len({s.encrypted_data_key for s in sealed}) == 1
    assert len({s.nonce for s in sealed}) == 20
    assert len({k.key_id for k in keys}) == len({k.address for k in keys}) == 20


def test_signatures_verify_and_are_deterministic(signer: EnclaveSigner) -> None:
    [key] = signer.create_keys("ethereum", 1)
    ref = key.reference
    signature = signer.sign_digest(ref, DIGEST)
    assert recover_public_key(DIGEST, signature.to_bytes()) == key.public_key
    der = encode_dss_signature(signature.r, signature.s)
    assert coincurve.PublicKey(key.public_key).verify(der, DIGEST, hasher=None)
    signer.flush_cache()
    assert signer.sign_digest(ref, DIGEST) == signature


def test_the_cache_saves_kms_and_storage_round_trips_until_flushed(
    signer: EnclaveSigner, kms: MemoryKms, blobs: MemoryBlobStore
) -> None:
    [key] = signer.create_keys("ethereum", 1)
    signer.sign_digest(key.reference, DIGEST)
    decrypts, gets = kms.decrypted, blobs.gets
    for _ in range(5):
        signer.sign_digest(key.reference, DIGEST)
    assert (kms.decrypted, blobs.gets) == (decrypts, gets)
    assert signer.cached_keys == 1
    assert signer.flush_cache() == 1
    signer.sign_digest(key.reference, DIGEST)
    assert (kms.decrypted, blobs.gets) == (decrypts + 1, gets + 1)


def test_cache_use_limit_forces_a_fresh_unseal(kms: MemoryKms, blobs: MemoryBlobStore) -> None:
    signer = EnclaveSigner(kms, blobs, cache=UnsealedKeyCache(max_uses=2))
    [key] = signer.create_keys("ethereum", 1)
    before = kms.decrypted
    for _ in range(4):
        signer.sign_digest(key.reference, DIGEST)
    assert kms.decrypted == before + 2


def test_a_proven_key_signs_with_the_cache_use_of_its_proof(
    kms: MemoryKms, blobs: MemoryBlobStore
) -> None:
    """The gate proves a key's labels, then signs: one use of the cache between them, so
    ``max_uses`` counts signatures."""
    signer = EnclaveSigner(kms, blobs, cache=UnsealedKeyCache(max_uses=2))
    [key] = signer.create_keys("ethereum", 1)
    before = kms.decrypted
    signatures = [signer.proven_key(key.reference).sign_digest(DIGEST) for _ in range(4)]
    assert kms.decrypted == before + 2
    public_key = signatures[0].recover_public_key(DIGEST)
    assert eth_address(public_key) == key.address
    assert "ProvenKey(" in repr(signer.proven_key(key.reference))
    assert key.key_id in repr(signer.proven_key(key.reference))


def test_a_proof_with_a_wrong_claim_gives_no_key(
    signer: EnclaveSigner, kms: MemoryKms, blobs: MemoryBlobStore
) -> None:
    [key] = signer.create_keys("ethereum", 1)
    claimed = dataclasses.replace(key.reference, labels=("treasury",))
    with pytest.raises(IntegrityError):
        signer.proven_key(claimed)


@pytest.mark.parametrize("field", ["encrypted_private_key", "nonce", "encrypted_data_key"])
def test_tampered_blob_fields_fail_closed(
    signer: EnclaveSigner, blobs: MemoryBlobStore, field: str
) -> None:
    [key] = signer.create_keys("ethereum", 1)
    body = cbor2.loads(read_sealed(blobs, key.blob))
    value = bytearray(body[field])
    value[len(value) // 2] ^= 0x01
    body[field] = bytes(value)
    assert replace_sealed(blobs, key.blob, cbor2.dumps(body)) == key.blob  # same range
    with pytest.raises(IntegrityError):
        signer.sign_digest(key.reference, DIGEST)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda blob: blob[:-1],
        lambda blob: b"",
        lambda blob: b"\x00" * 100,
        lambda blob: cbor2.dumps({**cbor2.loads(blob), "version": 3}),
        lambda blob: cbor2.dumps({**cbor2.loads(blob), "version": 1}),
        lambda blob: cbor2.dumps({**cbor2.loads(blob), "algorithm": "AES-128-GCM"}),
        lambda blob: cbor2.dumps({k: v for k, v in cbor2.loads(blob).items() if k != "nonce"}),
        lambda blob: cbor2.dumps([1, 2, 3]),
        lambda blob: blob + b"\x00" * 5000,
    ],
    ids=[
        "truncated",
        "empty",
        "zeros",
        "unknown-version",
        "downgraded-to-version-1",
        "algorithm",
        "no-nonce",
        "list",
        "huge",
    ],
)
def test_malformed_blobs_are_integrity_errors(
    signer: EnclaveSigner, blobs: MemoryBlobStore, mangle: object
) -> None:
    [key] = signer.create_keys("ethereum", 1)
    mangled = mangle(read_sealed(blobs, key.blob))  # type: ignore[operator]
    reference = dataclasses.replace(key.reference, blob=replace_sealed(blobs, key.blob, mangled))
    with pytest.raises(IntegrityError) as info:
        signer.sign_digest(reference, DIGEST)
    assert info.value.message == "sealed key blob failed its integrity check"


def test_blobs_swapped_between_two_keys_are_detected(
    signer: EnclaveSigner, blobs: MemoryBlobStore
) -> None:
    first, second = signer.create_keys("ethereum", 2)
    swap_sealed(blobs, first.blob, second.blob)
    for key in (first, second):
        with pytest.raises(IntegrityError):
            signer.sign_digest(key.reference, DIGEST)


def _signs_for(key: CreatedKey, signature: RecoverableSignature) -> bool:
    return eth_address(signature.recover_public_key(DIGEST)) == key.address


def _references(keys: list[CreatedKey]) -> list[KeyReference]:
    return [key.reference for key in keys]


def test_a_batchs_keys_unsealed_in_one_call_share_one_decrypt_and_one_read(
    signer: EnclaveSigner, kms: MemoryKms, blobs: MemoryBlobStore
) -> None:
    """Sweeping deposit addresses created together: one Decrypt per data key and one read
    per batch blob in a call, and every key still opens to itself."""
    batch = signer.create_keys("ethereum", 6)
    other = signer.create_keys("ethereum", 2)
    signer.flush_cache()
    decrypts, gets = kms.decrypted, blobs.gets
    unsealing = signer.unsealing(_references([*batch, *other]))
    for key in [*batch, *other]:
        assert _signs_for(key, signer.sign_digest(key.reference, DIGEST, unsealing))
    assert (kms.decrypted, blobs.gets) == (decrypts + 2, gets + 2)
    assert repr(unsealing) == "Unsealing(2 data keys unwrapped, 2 of 2 spans read)"
    signer.flush_cache()
    for key in batch:  # each call of its own: a Decrypt and a read each
        signer.sign_digest(key.reference, DIGEST)
    assert (kms.decrypted, blobs.gets) == (decrypts + 2 + 6, gets + 2 + 6)


def test_keys_a_call_was_not_told_of_share_its_data_keys_but_read_alone(
    signer: EnclaveSigner, kms: MemoryKms, blobs: MemoryBlobStore
) -> None:
    first, second, third = signer.create_keys("ethereum", 3)
    signer.sign_digest(first.reference, DIGEST)  # in memory: no reason to read its span
    signer.flush_cache()
    signer.sign_digest(first.reference, DIGEST)
    decrypts, gets = kms.decrypted, blobs.gets
    unsealing = signer.unsealing([first.reference, second.reference])  # second alone is cold
    for key in (second, third):
        assert _signs_for(key, signer.proven_key(key.reference, unsealing).sign_digest(DIGEST))
    assert (kms.decrypted, blobs.gets) == (decrypts + 1, gets + 2)
    assert repr(unsealing) == "Unsealing(1 data keys unwrapped, 0 of 0 spans read)"


def test_a_span_wider_than_one_ranged_read_is_read_key_by_key(
    signer: EnclaveSigner, blobs: MemoryBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = signer.create_keys("ethereum", 4)
    signer.flush_cache()
    monkeypatch.setattr(enclave_signer, "MAX_RANGE_LENGTH", range_of(keys[0].blob).length * 2)
    gets = blobs.gets
    unsealing = signer.unsealing(_references(keys))
    for key in keys:
        assert _signs_for(key, signer.sign_digest(key.reference, DIGEST, unsealing))
    assert blobs.gets == gets + 4


def test_a_shared_read_opens_no_key_whose_blob_was_tampered_with(
    signer: EnclaveSigner, kms: MemoryKms, blobs: MemoryBlobStore
) -> None:
    """A hostile host gains nothing from keys sharing a data key and a read in a call:
    swapped or altered keys of the batch still fail their own checks, and the untouched
    ones still sign."""
    first, second, altered, untouched = keys = signer.create_keys("ethereum", 4)
    swap_sealed(blobs, first.blob, second.blob)
    body = cbor2.loads(read_sealed(blobs, altered.blob))
    flipped = bytearray(body["encrypted_private_key"])
    flipped[0] ^= 0x01
    body["encrypted_private_key"] = bytes(flipped)
    replace_sealed(blobs, altered.blob, cbor2.dumps(body))
    signer.flush_cache()
    decrypts, gets = kms.decrypted, blobs.gets
    unsealing = signer.unsealing(_references(keys))
    assert _signs_for(untouched, signer.sign_digest(untouched.reference, DIGEST, unsealing))
    for key in (first, second, altered):
        with pytest.raises(IntegrityError):
            signer.sign_digest(key.reference, DIGEST, unsealing)
    assert (kms.decrypted, blobs.gets) == (decrypts + 1, gets + 1)


def test_a_blob_cut_short_fails_only_the_keys_it_lost(
    signer: EnclaveSigner, blobs: MemoryBlobStore
) -> None:
    """The span cannot be read whole: each key reads its own range, and only those past the
    cut meet KeyNotFound."""
    kept, lost = signer.create_keys("ethereum", 2)
    where = range_of(lost.blob)
    whole = blobs.get(where.name)
    blobs.delete(where.name)
    blobs.put(where.name, whole[: where.offset + 10])
    signer.flush_cache()
    unsealing = signer.unsealing([kept.reference, lost.reference])
    assert _signs_for(kept, signer.sign_digest(kept.reference, DIGEST, unsealing))
    with pytest.raises(KeyNotFound):
        signer.sign_digest(lost.reference, DIGEST, unsealing)


def test_a_tampered_wrapped_data_key_fails_only_its_own_key(
    signer: EnclaveSigner, kms: MemoryKms, blobs: MemoryBlobStore
) -> None:
    tampered, intact = keys = signer.create_keys("ethereum", 2)
    body = cbor2.loads(read_sealed(blobs, tampered.blob))
    wrapped = bytearray(body["encrypted_data_key"])
    wrapped[-1] ^= 0x01
    body["encrypted_data_key"] = bytes(wrapped)
    replace_sealed(blobs, tampered.blob, cbor2.dumps(body))
    signer.flush_cache()
    unsealing = signer.unsealing(_references(keys))
    with pytest.raises(IntegrityError):
        signer.sign_digest(tampered.reference, DIGEST, unsealing)
    assert _signs_for(intact, signer.sign_digest(intact.reference, DIGEST, unsealing))


def _counting(monkeypatch: pytest.MonkeyPatch, owner: object, method: str) -> list[int]:
    """Count the calls of ``owner.method`` (attempts, failed ones included)."""
    calls = [0]
    original = getattr(owner, method)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, method, counted)
    return calls


@pytest.mark.parametrize(
    ("dependency", "call", "message"),
    [("kms", "decrypt", "memory KMS is down"), ("blobs", "get_range", "memory blob store is down")],
)
def test_a_dependency_down_fails_the_calls_other_keys_without_another_wait(
    signer: EnclaveSigner,
    kms: MemoryKms,
    blobs: MemoryBlobStore,
    monkeypatch: pytest.MonkeyPatch,
    dependency: str,
    call: str,
    message: str,
) -> None:
    """KMS or the store down during a cold batch: one attempt per data key or span, not one
    timeout per key; the next call asks again and signs."""
    down = kms if dependency == "kms" else blobs
    keys = signer.create_keys("ethereum", 5)
    signer.flush_cache()
    attempts = _counting(monkeypatch, down, call)
    down.down = True
    unsealing = signer.unsealing(_references(keys))
    for key in keys:
        with pytest.raises(DependencyUnavailable, match=message):
            signer.sign_digest(key.reference, DIGEST, unsealing)
    assert attempts == [1]
    assert signer.cached_keys == 0
    down.down = False
    unsealing = signer.unsealing(_references(keys))
    for key in keys:
        assert _signs_for(key, signer.sign_digest(key.reference, DIGEST, unsealing))
    assert attempts == [2]


def test_a_reference_pointing_at_another_keys_blob_is_detected(signer: EnclaveSigner) -> None:
    first, second = signer.create_keys("ethereum", 2)
    mixed = [
        KeyReference(first.key_id, first.chain, first.address, second.blob),
        KeyReference(first.key_id, first.chain, second.address, first.blob),
        KeyReference(second.key_id, first.chain, first.address, first.blob),
    ]
    for ref in mixed:
        with pytest.raises(IntegrityError):
            signer.sign_digest(ref, DIGEST)


def test_a_cached_key_is_not_served_for_a_different_reference(signer: EnclaveSigner) -> None:
    first, second = signer.create_keys("ethereum", 2)
    signer.sign_digest(first.reference, DIGEST)
    forged = KeyReference(first.key_id, first.chain, first.address, second.blob)
    with pytest.raises(IntegrityError):
        signer.sign_digest(forged, DIGEST)


@pytest.mark.parametrize("real_ciphertext", [True, False], ids=["real-ct", "made-up-ct"])
def test_a_forged_generate_data_key_answer_is_refused(real_ciphertext: bool) -> None:
    kms = ForgingKms(real_ciphertext=real_ciphertext)
    blobs = MemoryBlobStore()
    signer = EnclaveSigner(kms, blobs)
    with pytest.raises(IntegrityError):
        signer.create_keys("ethereum", 5)
    assert blobs.blobs == {}
    assert blobs.puts == 0


def test_kms_down_at_create_is_clear_and_recovers(
    signer: EnclaveSigner, kms: MemoryKms, blobs: MemoryBlobStore
) -> None:
    kms.down = True
    with pytest.raises(DependencyUnavailable):
        signer.create_keys("ethereum", 3)
    assert blobs.blobs == {}
    kms.down = False
    assert len(signer.create_keys("ethereum", 3)) == 3


def test_blob_store_failing_the_batch_write_leaves_nothing_and_recovers(
    signer: EnclaveSigner, blobs: MemoryBlobStore
) -> None:
    blobs.fail_puts_after = 0
    with pytest.raises(DependencyUnavailable):
        signer.create_keys("ethereum", 5)
    assert blobs.blobs == {}
    blobs.fail_puts_after = None
    keys = signer.create_keys("ethereum", 5)
    assert list(blobs.blobs) == [range_of(keys[0].blob).name]
    assert {range_of(k.blob).name for k in keys} == set(blobs.blobs)


def test_dependencies_down_at_sign_time_are_clear_and_recover(
    signer: EnclaveSigner, kms: MemoryKms, blobs: MemoryBlobStore
) -> None:
    [key] = signer.create_keys("ethereum", 1)
    for dependency in (kms, blobs):
        dependency.down = True
        with pytest.raises(DependencyUnavailable):
            signer.sign_digest(key.reference, DIGEST)
        with pytest.raises(DependencyUnavailable):
            signer.check_health()
        dependency.down = False
    signer.check_health()
    assert recover_public_key(DIGEST, signer.sign_digest(key.reference, DIGEST).to_bytes()) == (
        key.public_key
    )


@pytest.mark.parametrize("stuck", ["kms", "blobs"])
def test_a_dependency_that_hangs_is_named_by_the_health_check_in_time(
    signer: EnclaveSigner,
    kms: MemoryKms,
    blobs: MemoryBlobStore,
    monkeypatch: pytest.MonkeyPatch,
    stuck: str,
) -> None:
    """A part that hangs (it neither answers nor refuses) is named within the check's time,
    not left for the host's wait for the enclave to end first (then /readyz could only say
    that the enclave did not answer)."""
    release = threading.Event()
    hanging = kms if stuck == "kms" else blobs
    monkeypatch.setattr(hanging, "check_health", lambda: release.wait(10))
    started = time.monotonic()
    try:
        with pytest.raises(DependencyUnavailable) as caught:
            signer.check_health(within=0.5)
    finally:
        release.set()
    assert time.monotonic() - started < 2.0
    name = "KMS" if stuck == "kms" else "the blob store"
    assert caught.value.message == f"{name} did not answer the health check within 0.5 s"
    signer.check_health(within=0.5)


def test_the_health_check_reports_a_refusal_before_a_hang(
    signer: EnclaveSigner, kms: MemoryKms, blobs: MemoryBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    monkeypatch.setattr(blobs, "check_health", lambda: release.wait(10))
    kms.down = True
    try:
        with pytest.raises(DependencyUnavailable) as caught:
            signer.check_health(within=5.0)
    finally:
        release.set()
    assert "did not answer" not in caught.value.message


def test_missing_blob_is_key_not_found(signer: EnclaveSigner) -> None:
    with pytest.raises(KeyNotFound):
        signer.sign_digest(KeyReference("k", "ethereum", "0x" + "00" * 20, "enclave-k"), DIGEST)


@pytest.mark.parametrize(("chain", "count"), [("dogecoin", 1), ("ethereum", 0), ("ethereum", 1001)])
def test_bad_create_requests_are_refused(signer: EnclaveSigner, chain: str, count: int) -> None:
    with pytest.raises(InvalidField):
        signer.create_keys(chain, count)


def test_bad_digest_is_refused(signer: EnclaveSigner) -> None:
    [key] = signer.create_keys("ethereum", 1)
    with pytest.raises(InvalidField):
        signer.sign_digest(key.reference, b"\x00" * 31)


def test_creating_a_signer_reads_nothing(kms: MemoryKms, blobs: MemoryBlobStore) -> None:
    EnclaveSigner(kms, blobs).create_keys("ethereum", 50)
    gets, decrypts = blobs.gets, kms.decrypted
    signer = EnclaveSigner(kms, blobs)
    signer.check_health()
    assert (blobs.gets, kms.decrypted, signer.cached_keys) == (gets, decrypts, 0)


def test_with_the_local_kms_and_filesystem_store(tmp_path: Path) -> None:
    kms = LocalKms(tmp_path / "home")
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    signer = EnclaveSigner(kms, blobs)
    keys = signer.create_keys("ethereum", 3)
    for key in keys:
        signature = signer.sign_digest(key.reference, DIGEST)
        assert recover_public_key(DIGEST, signature.to_bytes()) == key.public_key
    fresh = EnclaveSigner(LocalKms(tmp_path / "home"), FilesystemBlobStore(tmp_path / "blobs"))
    assert fresh.sign_digest(keys[0].reference, DIGEST) == signer.sign_digest(
        keys[0].reference, DIGEST
    )
    replace_sealed(blobs, keys[1].blob, read_sealed(blobs, keys[2].blob))
    with pytest.raises(IntegrityError):
        fresh.sign_digest(keys[1].reference, DIGEST)
    other_kms = EnclaveSigner(LocalKms(tmp_path / "other"), blobs)
    with pytest.raises(IntegrityError):
        other_kms.sign_digest(keys[0].reference, DIGEST)


def test_big_batches_are_sealed_one_at_a_time(kms: MemoryKms, blobs: MemoryBlobStore) -> None:
    sealing = [0]
    most = [0]
    lock = threading.Lock()

    def counting_deriver(chain: str) -> Callable[[bytes], str]:
        def address_of(public_key: bytes) -> str:
            with lock:
                sealing[0] += 1
                most[0] = max(most[0], sealing[0])
            time.sleep(0.0005)
            with lock:
                sealing[0] -= 1
            return eth_address(public_key)

        return address_of

    signer = EnclaveSigner(kms, blobs, address_deriver=counting_deriver)
    made: list[list[CreatedKey]] = []
    threads = [
        threading.Thread(target=lambda: made.append(signer.create_keys("ethereum", 100)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1
    assert blobs.puts == 3
    assert sorted(len(keys) for keys in made) == [100, 100, 100]
    for keys in made:
        assert signer.sign_digest(keys[-1].reference, DIGEST).recover_public_key(DIGEST) == (
            keys[-1].public_key
        )


class SlowKms(MemoryKms):
    """Each decrypt takes a while, as a round trip to KMS does."""

    def decrypt(self, ciphertext: bytes, **options: Any) -> Secret:
        time.sleep(0.05)
        return super().decrypt(ciphertext, **options)


def test_callers_missing_the_cache_together_unseal_a_key_once(blobs: MemoryBlobStore) -> None:
    """When a key's cache entry runs out under load, the callers that miss it at the same
    moment wait for one unseal instead of each calling KMS (and each reading its blob)."""
    kms = SlowKms()
    signer = EnclaveSigner(kms, blobs)
    [created] = signer.create_keys("ethereum", 1)
    reference = created.reference
    signer.flush_cache()
    kms.decrypted = 0
    start = threading.Barrier(8)
    signatures: list[bytes] = []

    def sign() -> None:
        start.wait()
        signatures.append(signer.sign_digest(reference, DIGEST).to_bytes())

    threads = [threading.Thread(target=sign) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(signatures) == 8
    assert kms.decrypted == 1
    assert recover_public_key(DIGEST, signatures[0]) == created.public_key


def test_a_stalled_unseal_holds_up_only_its_own_key(kms: MemoryKms) -> None:
    """While one key's blob read stalls, every other key unseals at once, whatever its
    reference; the stalled key's callers wait for that one read, then all sign."""
    blobs = SlowBlobStore()
    signer = EnclaveSigner(kms, blobs)
    [stalled] = signer.create_keys("ethereum", 1)
    others = signer.create_keys("ethereum", 500)  # one batch blob, read at full speed
    signer.flush_cache()
    blobs.slow.add(range_of(stalled.blob).name)
    waiting: list[bytes] = []
    callers = [
        threading.Thread(
            target=lambda: waiting.append(signer.sign_digest(stalled.reference, DIGEST).to_bytes())
        )
        for _ in range(2)
    ]
    for caller in callers:
        caller.start()
    done = threading.Event()

    def sign_the_others() -> None:
        for key in others:
            signer.sign_digest(key.reference, DIGEST)
        done.set()

    threading.Thread(target=sign_the_others, daemon=True).start()
    try:
        assert done.wait(timeout=5), "a key waited on another key's stalled unseal"
        assert waiting == []
    finally:
        blobs.release.set()
    for caller in callers:
        caller.join(timeout=5)
    assert [recover_public_key(DIGEST, signature) for signature in waiting] == [
        stalled.public_key
    ] * 2
    assert len(signer._unsealing) == 0  # no lock outlives its users
