"""The shared signature normaliser, checked against libsecp256k1 and pyca/cryptography."""

from __future__ import annotations

import os

import coincurve
import pytest
from cryptography.exceptions import InvalidSignature as InvalidSignatureError
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
    PARALLEL_MIN,
    RecoverableSignature,
    check_digest,
    normalize_signature,
    sign_digest_with,
    sign_digests_with,
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


def test_a_signature_from_bytes_keeps_them_and_equals_one_built_from_numbers() -> None:
    sig = sign_digest_with(coincurve.PrivateKey(), os.urandom(32))
    built = RecoverableSignature(sig.r, sig.s, sig.recovery_id)
    assert built == sig and hash(built) == hash(sig) and repr(built) == repr(sig)
    assert (
        built.to_bytes() == sig.to_bytes() == RecoverableSignature.from_bytes(sig.to_bytes())._bytes
    )
    with pytest.raises(InvalidSignature):
        RecoverableSignature.from_bytes(sig.to_bytes()[:64] + bytes([4]))


@pytest.mark.parametrize("count", [1, PARALLEL_MIN - 1, PARALLEL_MIN, 3 * PARALLEL_MIN + 5])
def test_signing_many_gives_each_signature_in_order(count: int) -> None:
    """Below and above the size where helper threads share the work: the same signatures
    (RFC 6979 nonces are deterministic) as one by one, in the order asked."""
    keys = [coincurve.PrivateKey() for _ in range(7)]
    pairs = [(keys[n % 7], os.urandom(32)) for n in range(count)]
    assert sign_digests_with(pairs) == [sign_digest_with(key, digest) for key, digest in pairs]


def test_a_digest_of_the_wrong_size_refuses_the_whole_list() -> None:
    key = coincurve.PrivateKey()
    pairs = [(key, os.urandom(32)) for _ in range(2 * PARALLEL_MIN)]
    pairs[-1] = (key, b"\x00" * 31)
    with pytest.raises(InvalidField):
        sign_digests_with(pairs)


def test_secret_never_prints_its_value() -> None:
    secret = Secret("hunter2-very-secret")
    for text in (str(secret), repr(secret), f"{secret}", f"{secret!r}", str([secret])):
        assert "hunter2" not in text
    assert secret.reveal() == "hunter2-very-secret"
    assert secret == Secret("hunter2-very-secret")


# Signatures made without a private key. ECDSA lets anyone build a valid (r, s, digest) for a
# chosen nonce point R and key Q as long as R = a·G + b·Q for known a, b: then r = x(R) mod n,
# s = r·b⁻¹ and e = a·s verify. That reaches what real signing almost never does: x(R) ≥ n
# (recovery ids 2 and 3) and keys with x(Q) ≥ n.

FIELD_PRIME = 2**256 - 2**32 - 977


def _point(x: int, odd: bool = False) -> coincurve.PublicKey:
    return coincurve.PublicKey(bytes([3 if odd else 2]) + x.to_bytes(32, "big"))


def _points_with_x_at_least_n() -> list[int]:
    """x-coordinates in [n, p) that lie on the curve (there are few; take the first ones)."""
    found = []
    x = CURVE_ORDER + 1
    while len(found) < 3:
        if pow((x**3 + 7) % FIELD_PRIME, (FIELD_PRIME - 1) // 2, FIELD_PRIME) == 1:
            found.append(x)
        x += 1
    return found


def _scalar() -> int:
    return int.from_bytes(os.urandom(32), "big") % (CURVE_ORDER - 1) + 1


def _times(point: coincurve.PublicKey, k: int) -> coincurve.PublicKey:
    return point.multiply(k.to_bytes(32, "big"))


def _g(k: int) -> coincurve.PublicKey:
    return coincurve.PublicKey.from_secret(k.to_bytes(32, "big"))


def _forge_for_nonce(nonce: coincurve.PublicKey) -> tuple[bytes, int, int, bytes]:
    """(public key, r, s, digest) whose verification yields exactly ``nonce`` as R."""
    a, b = _scalar(), _scalar()
    shifted = coincurve.PublicKey.combine_keys([nonce, _g(CURVE_ORDER - a)])
    public = _times(shifted, pow(b, -1, CURVE_ORDER)).format()
    r = int.from_bytes(nonce.format()[1:], "big") % CURVE_ORDER
    s = r * pow(b, -1, CURVE_ORDER) % CURVE_ORDER
    return public, r, s, (a * s % CURVE_ORDER).to_bytes(32, "big")


def _forge_for_key(public: coincurve.PublicKey) -> tuple[int, int, bytes]:
    """(r, s, digest) valid for ``public`` (whose private key nobody knows)."""
    a, b = _scalar(), _scalar()
    nonce = coincurve.PublicKey.combine_keys([_g(a), _times(public, b)])
    r = int.from_bytes(nonce.format()[1:], "big") % CURVE_ORDER
    s = r * pow(b, -1, CURVE_ORDER) % CURVE_ORDER
    return r, s, (a * s % CURVE_ORDER).to_bytes(32, "big")


def _reference_recovery_id(r: int, s: int, digest: bytes, public: bytes) -> int:
    """The old way: recover with each candidate id (libsecp256k1) and keep the one that fits."""
    matches = []
    for candidate in range(4):
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([candidate])
        try:
            key = coincurve.PublicKey.from_signature_and_message(sig, digest, hasher=None)
        except ValueError:
            continue
        if key.format() == public:
            matches.append(candidate)
    assert len(matches) == 1
    return matches[0]


def _openssl_verifies(public: bytes, r: int, s: int, digest: bytes) -> bool:
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), public)
    try:
        key.verify(encode_dss_signature(r, s), digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    except InvalidSignatureError:
        return False
    return True


def _check_forms(public: bytes, r: int, s: int, digest: bytes) -> RecoverableSignature:
    """Every input form of (r, s) and of (r, n − s) normalises to one reference signature."""
    assert _openssl_verifies(public, r, s, digest)
    low_s = min(s, CURVE_ORDER - s)
    expected = RecoverableSignature(r, low_s, _reference_recovery_id(r, low_s, digest, public))
    for s_in in (s, CURVE_ORDER - s):
        raw = r.to_bytes(32, "big") + s_in.to_bytes(32, "big")
        recid = expected.recovery_id ^ (s_in != low_s)
        for form in (raw, encode_dss_signature(r, s_in), raw + bytes([recid])):
            assert normalize_signature(form, digest, public) == expected
        with pytest.raises(InvalidSignature):
            normalize_signature(raw + bytes([recid ^ 1]), digest, public)
        with pytest.raises(InvalidSignature):
            normalize_signature(raw, digest, coincurve.PrivateKey().public_key.format())
    uncompressed = coincurve.PublicKey(public).format(compressed=False)
    assert normalize_signature(encode_dss_signature(r, s), digest, uncompressed) == expected
    return expected


def test_nonce_points_with_x_at_least_n_give_recovery_ids_2_and_3() -> None:
    """R with x ≥ n gives id 2 with an even y and 3 with an odd one, for a low s. (A high s
    flips the parity of the low-s form, which ``_check_forms`` checks; the forged s is
    random, so it is drawn again until it is low, or the ids seen would depend on luck.)"""
    seen = set()
    for x in _points_with_x_at_least_n():
        for odd in (False, True):
            public, r, s, digest = _forge_for_nonce(_point(x, odd))
            while s > CURVE_ORDER // 2:
                public, r, s, digest = _forge_for_nonce(_point(x, odd))
            recovery_id = _check_forms(public, r, s, digest).recovery_id
            assert recovery_id == 2 + odd
            seen.add(recovery_id)
    assert seen == {2, 3}


def test_keys_with_x_at_least_n_and_the_keys_with_x_equal_to_n() -> None:
    for x in [*_points_with_x_at_least_n(), CURVE_ORDER]:
        for odd in (False, True):
            public = _point(x, odd)
            for _ in range(4):
                _check_forms(public.format(), *_forge_for_key(public))


@settings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=1, max_value=CURVE_ORDER - 1),
    st.binary(min_size=32, max_size=32),
    st.integers(min_value=1, max_value=CURVE_ORDER - 1),
)
def test_matches_recovering_each_candidate_and_openssl(secret: int, digest: bytes, k: int) -> None:
    """Differential: any valid (r, s) — low or high S, any digest — against the old search."""
    public = _g(secret).format()
    r = int.from_bytes(_g(k).format()[1:], "big") % CURVE_ORDER
    e = int.from_bytes(digest, "big") % CURVE_ORDER
    s = pow(k, -1, CURVE_ORDER) * (e + r * secret) % CURVE_ORDER
    if s == 0:
        return
    _check_forms(public, r, s, digest)


def test_a_signature_for_another_digest_or_key_is_refused_in_every_form() -> None:
    secret = coincurve.PrivateKey()
    public = secret.public_key.format()
    digest = os.urandom(32)
    sig = sign_digest_with(secret, digest)
    other_digest = bytes([digest[0] ^ 1]) + digest[1:]
    for s in (sig.s, CURVE_ORDER - sig.s):
        raw = sig.r.to_bytes(32, "big") + s.to_bytes(32, "big")
        for form in (raw, encode_dss_signature(sig.r, s)):
            with pytest.raises(InvalidSignature):
                normalize_signature(form, other_digest, public)
            with pytest.raises(InvalidSignature):
                normalize_signature(form, digest, coincurve.PrivateKey().public_key.format())
    with pytest.raises(InvalidSignature):
        normalize_signature(sig.to_bytes()[:64] + b"\x05", digest, public)
    with pytest.raises(InvalidField):
        normalize_signature(sig.to_bytes(), digest, b"\x02" + b"\xff" * 32)
