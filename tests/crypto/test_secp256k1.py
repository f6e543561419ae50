"""The shared signature normaliser, checked against libsecp256k1 and pyca/cryptography."""

from __future__ import annotations

import os

import coincurve
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from signd.crypto.secp256k1 import (
    CURVE_ORDER,
    HALF_CURVE_ORDER,
    RecoverableSignature,
    check_digest,
    normalize_signature,
    sign_digest_with,
)
from signd.crypto.secret import Secret
from signd.errors import InvalidField, InvalidSignature


def _pyca_key() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256K1())
    public = key.public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
    return key, public


def _recovers_to(sig: RecoverableSignature, digest: bytes, public: bytes) -> bool:
    recovered = coincurve.PublicKey.from_signature_and_message(sig.to_bytes(), digest, hasher=None)
    return recovered.format() == public


def test_der_signatures_from_another_library_normalise_to_low_s_and_recover() -> None:
    """pyca/OpenSSL does not enforce low-S: about half its signatures are high-S."""
    key, public = _pyca_key()
    high_s_seen = 0
    for _ in range(200):
        digest = os.urandom(32)
        der = key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        _, s = decode_dss_signature(der)
        high_s_seen += s > HALF_CURVE_ORDER
        sig = normalize_signature(der, digest, public)
        assert sig.s <= HALF_CURVE_ORDER
        assert _recovers_to(sig, digest, public)
        assert coincurve.PublicKey(public).verify(
            encode_dss_signature(sig.r, sig.s), digest, hasher=None
        )
    assert high_s_seen > 50


@pytest.mark.parametrize("form", ["raw64", "raw65", "raw65_v27", "der"])
def test_every_input_form_gives_the_same_normalised_signature(form: str) -> None:
    secret = coincurve.PrivateKey()
    public = secret.public_key.format()
    digest = os.urandom(32)
    reference = sign_digest_with(secret, digest)
    r, s, recid = reference.r, reference.s, reference.recovery_id
    high_s = CURVE_ORDER - s
    encoded = {
        "raw64": r.to_bytes(32, "big") + high_s.to_bytes(32, "big"),
        "raw65": r.to_bytes(32, "big") + high_s.to_bytes(32, "big") + bytes([recid ^ 1]),
        "raw65_v27": r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([27 + recid]),
        "der": encode_dss_signature(r, high_s),
    }[form]
    assert normalize_signature(encoded, digest, public) == reference


def test_wrong_key_wrong_recovery_id_and_garbage_are_refused() -> None:
    secret, other = coincurve.PrivateKey(), coincurve.PrivateKey()
    digest = os.urandom(32)
    sig = sign_digest_with(secret, digest)
    with pytest.raises(InvalidSignature):
        normalize_signature(sig.to_bytes(), digest, other.public_key.format())
    wrong_recid = sig.to_bytes()[:64] + bytes([sig.recovery_id ^ 1])
    with pytest.raises(InvalidSignature):
        normalize_signature(wrong_recid, digest, secret.public_key.format())
    for garbage in (b"", b"\x30\x02\x01", os.urandom(63), b"\x00" * 64, b"\xff" * 64):
        with pytest.raises(InvalidSignature):
            normalize_signature(garbage, digest, secret.public_key.format())


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=80))
def test_random_bytes_only_ever_raise_signd_errors(data: bytes) -> None:
    public = coincurve.PrivateKey().public_key.format()
    with pytest.raises(InvalidSignature):
        normalize_signature(data, b"\x01" * 32, public)


def test_digest_must_be_32_bytes() -> None:
    for bad in (b"", b"\x00" * 31, b"\x00" * 33):
        with pytest.raises(InvalidField):
            check_digest(bad)


def test_recoverable_signature_refuses_high_s_and_round_trips() -> None:
    sig = sign_digest_with(coincurve.PrivateKey(), os.urandom(32))
    assert RecoverableSignature.from_bytes(sig.to_bytes()) == sig
    with pytest.raises(InvalidSignature):
        RecoverableSignature(sig.r, CURVE_ORDER - sig.s, sig.recovery_id)


def test_secret_never_prints_its_value() -> None:
    secret = Secret("hunter2-very-secret")
    for text in (str(secret), repr(secret), f"{secret}", f"{secret!r}", str([secret])):
        assert "hunter2" not in text
    assert secret.reveal() == "hunter2-very-secret"
    assert secret == Secret("hunter2-very-secret")
