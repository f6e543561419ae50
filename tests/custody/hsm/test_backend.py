"""HsmBackend against a real SoftHSM2 token: keys, attributes, signatures, adoption, threads."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path

import coincurve
import pkcs11
import pytest
from pkcs11 import Attribute, ObjectClass
from pkcs11 import exceptions as p11

from signd.crypto.secp256k1 import CURVE_ORDER, HALF_CURVE_ORDER, RecoverableSignature
from signd.custody.hsm import HsmBackend, HsmToken, decode_ec_point
from signd.custody.hsm.backend import SECP256K1_EC_PARAMS
from signd.custody.hsm.library import Pkcs11Library
from signd.custody.hsm.pool import PooledSession
from signd.errors import CapacityExceeded, InvalidField, KeyExists, KeyNotFound
from signd.storage.sqlite import SqliteMetadataStore
from tests.custody.hsm.conftest import MAIN_TOKEN, USER_PIN, SoftHsm, eth_address


def recovered_address(signature: RecoverableSignature, digest: bytes) -> str:
    """The Ethereum sender recovered from a signature, independently of signd."""
    public = coincurve.PublicKey.from_signature_and_message(
        signature.to_bytes(), digest, hasher=None
    )
    return eth_address(public.format())


def token_session(softhsm: SoftHsm) -> pkcs11.Session:
    """A plain python-pkcs11 session on the module the backend loaded (a second
    ``pkcs11.lib`` would initialise it again); the backend's login covers this process."""
    return Pkcs11Library.load(softhsm.module).lib.get_token(token_label=MAIN_TOKEN).open()


def test_create_keys_records_metadata(backend: HsmBackend, metadata: SqliteMetadataStore) -> None:
    seen: list[int] = []
    keys = backend.create_keys("ethereum", eth_address, 3, labels=["hot"], progress=seen.append)
    assert seen == [1, 2, 3]
    assert len({key.key_id for key in keys}) == 3
    for key in keys:
        assert key.custody == "hsm"
        assert len(key.public_key) == 33
        assert key.address == eth_address(key.public_key)
        assert key.labels == ("hot",)
        assert len(bytes.fromhex(key.details["cka_id"])) == 16
        assert key.details["cka_label"] == f"signd-{key.key_id}"
        assert backend.find_key(key.address) == key
        assert backend.get_key(key.key_id).details == key.details
        assert metadata.find(key.key_id) is not None
    listed = backend.list_keys(label="hot", limit=10).keys
    assert [key.key_id for key in listed][-3:] == [key.key_id for key in keys]


def test_private_key_is_sensitive_and_never_extractable(
    backend: HsmBackend, softhsm: SoftHsm
) -> None:
    (key,) = backend.create_keys("ethereum", eth_address)
    cka_id = bytes.fromhex(key.details["cka_id"])
    session = token_session(softhsm)
    try:
        private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=cka_id)
        public = session.get_key(object_class=ObjectClass.PUBLIC_KEY, id=cka_id)
        assert private[Attribute.TOKEN] is True
        assert private[Attribute.PRIVATE] is True
        assert private[Attribute.SENSITIVE] is True
        assert private[Attribute.ALWAYS_SENSITIVE] is True
        assert private[Attribute.EXTRACTABLE] is False
        assert private[Attribute.NEVER_EXTRACTABLE] is True
        assert private[Attribute.SIGN] is True
        assert private[Attribute.DERIVE] is False
        assert private[Attribute.LABEL] == key.details["cka_label"]
        assert bytes(private[Attribute.EC_PARAMS]) == SECP256K1_EC_PARAMS
        with pytest.raises(p11.AttributeSensitive):
            private[Attribute.VALUE]
        assert decode_ec_point(public[Attribute.EC_POINT]) == key.public_key
    finally:
        session.close()


def test_decode_ec_point_accepts_wrapped_and_raw_points() -> None:
    public = coincurve.PrivateKey().public_key
    raw = public.format(compressed=False)
    compressed = public.format()
    assert decode_ec_point(b"\x04\x41" + raw) == compressed
    assert decode_ec_point(raw) == compressed
    assert decode_ec_point(compressed) == compressed
    assert decode_ec_point(b"\x04\x21" + compressed) == compressed
    assert decode_ec_point(b"\x04\x81\x41" + raw) == compressed
    with pytest.raises(InvalidField):
        decode_ec_point(b"\x04\x42" + raw)


def test_a_raw_point_whose_x_starts_like_a_der_length_is_read_as_raw() -> None:
    """0x04 then 0x3F: a wrapped point of 63 bytes, or a raw point whose X starts with 0x3F.
    No point has 63 bytes, so it is the raw point (this once failed 1 run in 256)."""
    secret = next(
        n for n in range(1, 10_000) if _uncompressed(n)[1] == 0x3F
    )  # a fixed key with that X
    raw = _uncompressed(secret)
    assert decode_ec_point(raw) == coincurve.PrivateKey.from_int(secret).public_key.format()


def _uncompressed(secret: int) -> bytes:
    return coincurve.PrivateKey.from_int(secret).public_key.format(compressed=False)
    with pytest.raises(InvalidField):
        decode_ec_point(b"\x05" * 65)


def test_two_thousand_signatures_verify_low_s_with_right_recovery_id(
    backend: HsmBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    (key,) = backend.create_keys("ethereum", eth_address)
    device_s: list[int] = []
    original = PooledSession.sign

    def spy(self: PooledSession, cka_id: bytes, digest: bytes) -> bytes:
        raw = original(self, cka_id, digest)
        device_s.append(int.from_bytes(raw[32:], "big"))
        return raw

    monkeypatch.setattr(PooledSession, "sign", spy)
    verifier = coincurve.PublicKey(key.public_key)
    for _ in range(2000):
        digest = os.urandom(32)
        signature = backend.sign_digest(key.key_id, digest)
        assert 0 < signature.s <= HALF_CURVE_ORDER
        assert 0 < signature.r < CURVE_ORDER
        der = coincurve.ecdsa.cdata_to_der(
            coincurve.ecdsa.deserialize_compact(signature.to_bytes()[:64])
        )
        assert verifier.verify(der, digest, hasher=None)
        assert recovered_address(signature, digest) == key.address
    assert len(device_s) == 2000
    high = sum(s > HALF_CURVE_ORDER for s in device_s)
    assert 700 < high < 1300, "SoftHSM should return high-S about half the time"


def test_signing_with_another_backends_key_is_refused(backend: HsmBackend) -> None:
    (key,) = backend.create_keys("ethereum", eth_address)
    foreign = dataclasses.replace(key, custody="keystore")
    with pytest.raises(KeyNotFound):
        backend.sign_digest(foreign, os.urandom(32))


def test_concurrent_signing_from_many_threads(
    softhsm: SoftHsm, metadata: SqliteMetadataStore
) -> None:
    backend = HsmBackend(softhsm.settings(pool_size=4), metadata)
    try:
        keys = backend.create_keys("ethereum", eth_address, 4)
        failures: list[BaseException] = []
        done = [0] * 8

        def worker(index: int) -> None:
            key = keys[index % len(keys)]
            try:
                for _ in range(200):
                    digest = os.urandom(32)
                    signature = backend.sign_digest(key, digest)
                    assert signature.recover_public_key(digest) == key.public_key
                    assert signature.s <= HALF_CURVE_ORDER
                    done[index] += 1
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not failures, failures[:3]
        assert done == [200] * 8
    finally:
        backend.close()


ADOPT_SCRIPT = """
import os, sys, pkcs11
from pkcs11 import Attribute, KeyType, Mechanism
from pkcs11.util.ec import encode_named_curve_parameters
module, label, pin, key_label, curve = sys.argv[1:6]
session = pkcs11.lib(module).get_token(token_label=label).open(rw=True, user_pin=pin)
cka_id = os.urandom(8)
session.generate_keypair(
    KeyType.EC, mechanism=Mechanism.EC_KEY_PAIR_GEN, store=True, label=key_label, id=cka_id,
    public_template={Attribute.EC_PARAMS: encode_named_curve_parameters(curve)},
    private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
)
session.close()
print(cka_id.hex())
"""


def make_outside_key(softhsm: SoftHsm, key_label: str, curve: str = "1.3.132.0.10") -> bytes:
    """Generate a key on the main token from another process, as an operator's tool would."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            ADOPT_SCRIPT,
            str(softhsm.module),
            MAIN_TOKEN,
            USER_PIN,
            key_label,
            curve,
        ],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "SOFTHSM2_CONF": str(softhsm.conf)},
    )
    return bytes.fromhex(result.stdout.strip())


def test_adopt_key_made_outside_signd(backend: HsmBackend, softhsm: SoftHsm) -> None:
    label = "outside-" + os.urandom(4).hex()
    cka_id = make_outside_key(softhsm, label)
    make_outside_key(softhsm, label + "-p256", curve="1.2.840.10045.3.1.7")
    on_token = {key.label: key for key in backend.list_token_keys()}
    assert label in on_token
    assert label + "-p256" not in on_token, "only secp256k1 keys are listed"
    assert on_token[label].cka_id == cka_id

    (adopted,) = backend.adopt_keys("ethereum", eth_address, label=label, labels=["adopted"])
    assert adopted.public_key == on_token[label].public_key
    assert adopted.details == {"cka_id": cka_id.hex(), "cka_label": label}
    assert backend.find_key(adopted.address) == adopted
    digest = os.urandom(32)
    assert recovered_address(backend.sign_digest(adopted.key_id, digest), digest) == adopted.address

    with pytest.raises(KeyExists):
        backend.adopt_keys("ethereum", eth_address, key_id_attr=cka_id.hex())
    with pytest.raises(KeyNotFound):
        backend.adopt_keys("ethereum", eth_address, label="no-such-label")
    with pytest.raises(InvalidField):
        backend.adopt_keys("ethereum", eth_address)


def test_signd_made_keys_cannot_be_adopted_twice(backend: HsmBackend) -> None:
    (key,) = backend.create_keys("ethereum", eth_address)
    with pytest.raises(KeyExists):
        backend.adopt_keys(
            "ethereum", eth_address, key_id_attr=bytes.fromhex(key.details["cka_id"])
        )


def test_capacity_reached_raises_capacity_exceeded_and_keeps_earlier_keys(
    backend: HsmBackend, metadata: SqliteMetadataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = HsmToken._generate
    calls = 0

    def generate_until_full(pooled: PooledSession, cka_id: bytes, label: str) -> bytes:
        nonlocal calls
        calls += 1
        if calls > 2:
            raise p11.DeviceMemory()
        return original(pooled, cka_id, label)

    monkeypatch.setattr(HsmToken, "_generate", staticmethod(generate_until_full))
    before = len(metadata.list(custody="hsm", limit=1000).records)
    with pytest.raises(CapacityExceeded):
        backend.create_keys("ethereum", eth_address, 5)
    assert len(metadata.list(custody="hsm", limit=1000).records) == before + 2
    assert calls == 3, "a capacity error is not retried"


def test_health_check_passes_on_a_working_token(backend: HsmBackend) -> None:
    backend.check_health()


def test_keys_survive_a_new_backend(softhsm: SoftHsm, tmp_path: Path) -> None:
    store = SqliteMetadataStore(tmp_path / "m.db")
    first = HsmBackend(softhsm.settings(), store)
    (key,) = first.create_keys("ethereum", eth_address)
    first.close()
    second = HsmBackend(softhsm.settings(pool_size=1), store)
    try:
        digest = os.urandom(32)
        assert recovered_address(second.sign_digest(key.key_id, digest), digest) == key.address
    finally:
        second.close()
        store.close()
