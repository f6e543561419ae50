"""verify_attestation against the real AWS Nitro samples and hand-built chains."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signd.attestation import (
    AttestationDocument,
    CoseSign1,
    aws_nitro_root_certificate,
    load_root_certificates,
    verify_attestation,
)
from signd.errors import AccessDenied, ConfigurationError, InvalidField
from tests.attestation.conftest import NITRO, SAMPLE_IDS, SAMPLES, sample_bytes, sample_time
from tests.attestation.pki import Issued, issue, sign_document
from tests.vectors import vector_path

GA_SAMPLE = SAMPLES[0]
MAX_AGE = timedelta(minutes=5)


def _pcrs(sample: dict[str, Any]) -> dict[int, bytes]:
    return {int(index): bytes.fromhex(value) for index, value in sample["pcrs"].items()}


def _optional(hex_value: str | None) -> bytes | None:
    return None if hex_value is None else bytes.fromhex(hex_value)


def _verify_sample(
    raw: bytes, root: x509.Certificate, sample: dict[str, Any] = GA_SAMPLE, **kwargs: Any
) -> AttestationDocument:
    kwargs.setdefault("max_age", MAX_AGE)
    kwargs.setdefault("now", sample_time(sample))
    return verify_attestation(raw, root_certificates=[root], **kwargs)


def _flip(raw: bytes, offset: int) -> bytes:
    return raw[:offset] + bytes([raw[offset] ^ 0x01]) + raw[offset + 1 :]


def _ga_document() -> AttestationDocument:
    return AttestationDocument.decode(CoseSign1.decode(sample_bytes(GA_SAMPLE)).payload)


# -- the real samples ----------------------------------------------------------------------


def test_signd_copy_of_the_aws_root_is_the_published_one(aws_root: x509.Certificate) -> None:
    embedded = aws_nitro_root_certificate()
    assert embedded == aws_root
    fingerprint = hashlib.sha256(embedded.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert fingerprint == NITRO["root_certificate"]["sha256_fingerprint"]
    pem = vector_path("aws_nitro_enclaves_root_g1.pem").read_bytes()
    assert load_root_certificates(pem) == [aws_root]


@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_real_samples_verify_at_their_own_time(
    sample: dict[str, Any], aws_root: x509.Certificate
) -> None:
    document = _verify_sample(
        sample_bytes(sample),
        aws_root,
        sample,
        expected_pcrs=_pcrs(sample),
        nonce=_optional(sample["nonce_hex"]),
    )
    assert document.module_id == sample["module_id"]
    assert document.timestamp == sample_time(sample)
    assert dict(document.pcrs) == _pcrs(sample)
    assert document.public_key == _optional(sample["public_key_hex"])
    assert document.user_data == _optional(sample["user_data_hex"])
    assert document.nonce == _optional(sample["nonce_hex"])


def test_tagged_document_verifies(aws_root: x509.Certificate) -> None:
    tagged = cbor2.dumps(cbor2.CBORTag(18, cbor2.loads(sample_bytes(GA_SAMPLE))))
    assert _verify_sample(tagged, aws_root).module_id == GA_SAMPLE["module_id"]


def test_ga_sample_matches_evervaults_expected_pcrs(aws_root: x509.Certificate) -> None:
    spec = GA_SAMPLE["expected_per_source"]
    assert "isAttestationDocValid=true" in spec
    found = re.search(r"expected PCR([\d/]+) = 48 zero bytes", spec)
    assert found is not None
    expected = {int(index): bytes(48) for index in found.group(1).split("/")}
    assert sorted(expected) == [0, 1, 2, 8]
    _verify_sample(sample_bytes(GA_SAMPLE), aws_root, expected_pcrs=expected)


def test_beta_sample_with_real_pcrs_refuses_debug_mode_zeros(aws_root: x509.Certificate) -> None:
    sample = SAMPLES[1]
    with pytest.raises(AccessDenied, match="PCR0 does not match"):
        _verify_sample(sample_bytes(sample), aws_root, sample, expected_pcrs={0: bytes(48)})


@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_real_samples_are_refused_against_the_dev_root(sample: dict[str, Any], nsm: Any) -> None:
    with pytest.raises(AccessDenied, match="cabundle\\[0\\] is not a trusted root"):
        _verify_sample(sample_bytes(sample), nsm.root_certificate, sample)


def test_time_checks_use_the_document_timestamp(aws_root: x509.Certificate) -> None:
    """The certificates expired long ago, yet without a freshness bound the chain holds."""
    raw = sample_bytes(GA_SAMPLE)
    today = datetime.now(UTC)
    assert _verify_sample(raw, aws_root, max_age=None, now=today).module_id
    with pytest.raises(AccessDenied, match="stale"):
        _verify_sample(raw, aws_root, max_age=MAX_AGE, now=today)


def _bytes_offset(raw: bytes, needle: bytes) -> int:
    offset = raw.index(needle)
    assert raw.count(needle) == 1
    return offset


def _tampered(part: str) -> bytes:
    raw = sample_bytes(GA_SAMPLE)
    document = _ga_document()
    if part == "payload":
        return _flip(raw, raw.index(b"module_id") + len("module_id") + 4)
    if part == "signature":
        return _flip(raw, len(raw) - 10)
    if part == "pcr":
        return _flip(raw, _bytes_offset(raw, document.pcrs[3]) + 5)
    if part == "nonce":
        assert document.nonce is not None
        return _flip(raw, _bytes_offset(raw, document.nonce))
    der = document.certificate if part == "certificate" else document.cabundle[int(part[-2])]
    return _flip(raw, _bytes_offset(raw, der) + len(der) - 1)


@pytest.mark.parametrize(
    ("part", "message"),
    [
        ("payload", "COSE signature does not verify"),
        ("signature", "COSE signature does not verify"),
        ("pcr", "COSE signature does not verify"),
        ("nonce", "COSE signature does not verify"),
        ("certificate", "certificate is not issued by cabundle\\[3\\]"),
        ("cabundle[3]", "cabundle\\[3\\] is not issued by cabundle\\[2\\]"),
        ("cabundle[2]", "cabundle\\[2\\] is not issued by cabundle\\[1\\]"),
        ("cabundle[1]", "cabundle\\[1\\] is not issued by cabundle\\[0\\]"),
        ("cabundle[0]", "cabundle\\[0\\] is not a trusted root"),
    ],
)
def test_a_flipped_byte_is_refused(part: str, message: str, aws_root: x509.Certificate) -> None:
    with pytest.raises(AccessDenied, match=message):
        _verify_sample(_tampered(part), aws_root)


def test_a_flipped_protected_header_is_refused(aws_root: x509.Certificate) -> None:
    with pytest.raises(InvalidField, match="protected header"):
        _verify_sample(_flip(sample_bytes(GA_SAMPLE), 4), aws_root)


# -- freshness and measurements ------------------------------------------------------------


def test_nonce_must_match(aws_root: x509.Certificate) -> None:
    document = _ga_document()
    assert document.nonce is not None
    assert _verify_sample(sample_bytes(GA_SAMPLE), aws_root, nonce=document.nonce)
    with pytest.raises(AccessDenied, match="nonce does not match"):
        _verify_sample(sample_bytes(GA_SAMPLE), aws_root, nonce=_flip(document.nonce, 0))
    with pytest.raises(AccessDenied, match="nonce does not match"):
        _verify_sample(sample_bytes(GA_SAMPLE), aws_root, nonce=document.nonce[:-1])


def test_a_nonce_is_required_when_one_is_expected(aws_root: x509.Certificate) -> None:
    sample = SAMPLES[2]
    assert sample["nonce_hex"] is None
    with pytest.raises(AccessDenied, match="nonce does not match"):
        _verify_sample(sample_bytes(sample), aws_root, sample, nonce=b"challenge")


def test_max_age_bounds_the_timestamp_both_ways(aws_root: x509.Certificate) -> None:
    raw, created = sample_bytes(GA_SAMPLE), sample_time(GA_SAMPLE)
    assert _verify_sample(raw, aws_root, now=created + MAX_AGE)
    assert _verify_sample(raw, aws_root, now=created - MAX_AGE)
    with pytest.raises(AccessDenied, match="stale"):
        _verify_sample(raw, aws_root, now=created + MAX_AGE + timedelta(milliseconds=1))
    with pytest.raises(AccessDenied, match="in the future"):
        _verify_sample(raw, aws_root, now=created - MAX_AGE - timedelta(milliseconds=1))


def test_expected_pcr0_must_match(aws_root: x509.Certificate) -> None:
    expected = _pcrs(GA_SAMPLE)
    expected[0] = _flip(expected[0], 47)
    with pytest.raises(AccessDenied, match="PCR0 does not match"):
        _verify_sample(sample_bytes(GA_SAMPLE), aws_root, expected_pcrs=expected)


def test_an_expected_pcr_must_be_present(aws_root: x509.Certificate) -> None:
    with pytest.raises(AccessDenied, match="PCR16 is missing"):
        _verify_sample(sample_bytes(GA_SAMPLE), aws_root, expected_pcrs={16: bytes(48)})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"expected_pcrs": {0: bytes(32)}}, "expected PCR0 must be 48 bytes"),
        ({"expected_pcrs": {"0": bytes(48)}}, "not a PCR index"),
        ({"expected_pcrs": {32: bytes(48)}}, "not a PCR index"),
        ({"now": datetime(2023, 9, 18, 15, 3, 30)}, "timezone-aware"),
        ({"max_age": timedelta(seconds=-1)}, "max_age must not be negative"),
    ],
)
def test_caller_mistakes_are_configuration_errors(
    kwargs: dict[str, Any], message: str, aws_root: x509.Certificate
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        _verify_sample(sample_bytes(GA_SAMPLE), aws_root, **kwargs)


def test_no_roots_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="no root certificates"):
        verify_attestation(sample_bytes(GA_SAMPLE), root_certificates=[], max_age=None)


def test_bad_root_pem_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="not valid PEM"):
        load_root_certificates(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")


# -- hand-built chains: each certificate rule ----------------------------------------------

AT = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)


def _document(leaf: Issued, *cabundle: Issued) -> AttestationDocument:
    return AttestationDocument(
        module_id="i-test-enc0",
        timestamp_ms=int(AT.timestamp() * 1000),
        pcrs={0: bytes(48)},
        certificate=leaf.der,
        cabundle=tuple(issued.der for issued in cabundle),
    )


def _verify_chain(
    leaf: Issued, *cabundle: Issued, signer: ec.EllipticCurvePrivateKey | None = None
) -> AttestationDocument:
    raw = sign_document(_document(leaf, *cabundle), signer or leaf.key)
    return verify_attestation(
        raw, root_certificates=[cabundle[0].certificate], max_age=MAX_AGE, now=AT
    )


@pytest.fixture(scope="module")
def root() -> Issued:
    return issue("root", issuer=None, at=AT, ca=True)


@pytest.fixture(scope="module")
def intermediate(root: Issued) -> Issued:
    return issue("intermediate", issuer=root, at=AT, ca=True, path_length=0)


@pytest.fixture(scope="module")
def leaf(intermediate: Issued) -> Issued:
    return issue("leaf", issuer=intermediate, at=AT, ca=False)


def test_a_well_formed_chain_verifies(root: Issued, intermediate: Issued, leaf: Issued) -> None:
    assert _verify_chain(leaf, root, intermediate).module_id == "i-test-enc0"


def test_one_of_several_roots_suffices(root: Issued, intermediate: Issued, leaf: Issued) -> None:
    raw = sign_document(_document(leaf, root, intermediate), leaf.key)
    roots = [aws_nitro_root_certificate(), root.certificate]
    assert verify_attestation(raw, root_certificates=roots, max_age=MAX_AGE, now=AT)


@pytest.mark.parametrize(
    ("flaw", "message"),
    [
        ({"not_before": AT - timedelta(days=2)}, "certificate is not valid at the document"),
        ({"not_before": AT + timedelta(seconds=1)}, "certificate is not valid at the document"),
        ({"ca": True}, "certificate must not be a CA"),
        ({"digital_signature": False}, "certificate may not sign documents"),
        ({"curve": ec.SECP256R1()}, "certificate is not a P-384 ECDSA-SHA384"),
    ],
)
def test_leaf_flaws_are_refused(
    flaw: dict[str, Any], message: str, root: Issued, intermediate: Issued
) -> None:
    flaw.setdefault("ca", False)
    bad_leaf = issue("leaf", issuer=intermediate, at=AT, **flaw)
    with pytest.raises(AccessDenied, match=message):
        _verify_chain(bad_leaf, root, intermediate)


@pytest.mark.parametrize(
    ("flaw", "message"),
    [
        ({"ca": False, "cert_sign": True}, "cabundle\\[1\\] is not a CA certificate"),
        ({"cert_sign": False}, "cabundle\\[1\\] may not sign certificates"),
        ({"not_before": AT - timedelta(days=2)}, "cabundle\\[1\\] is not valid at the document"),
        ({"hash_algorithm": hashes.SHA256()}, "cabundle\\[1\\] is not a P-384 ECDSA-SHA384"),
    ],
)
def test_intermediate_flaws_are_refused(flaw: dict[str, Any], message: str, root: Issued) -> None:
    flaw.setdefault("ca", True)
    bad = issue("intermediate", issuer=root, at=AT, **flaw)
    leaf = issue("leaf", issuer=bad, at=AT, ca=False)
    with pytest.raises(AccessDenied, match=message):
        _verify_chain(leaf, root, bad)


def test_path_length_is_enforced(root: Issued, intermediate: Issued) -> None:
    below = issue("below", issuer=intermediate, at=AT, ca=True)
    leaf = issue("leaf", issuer=below, at=AT, ca=False)
    with pytest.raises(AccessDenied, match="cabundle\\[1\\] path length constraint"):
        _verify_chain(leaf, root, intermediate, below)


def test_a_look_alike_issuer_is_refused(root: Issued, intermediate: Issued) -> None:
    impostor = issue("intermediate", issuer=root, at=AT, ca=True, path_length=0)
    leaf = issue("leaf", issuer=impostor, at=AT, ca=False)
    with pytest.raises(AccessDenied, match="certificate is not issued by cabundle\\[1\\]"):
        _verify_chain(leaf, root, intermediate)


def test_a_look_alike_root_is_refused(root: Issued, intermediate: Issued, leaf: Issued) -> None:
    other_root = issue("root", issuer=None, at=AT, ca=True)
    raw = sign_document(_document(leaf, root, intermediate), leaf.key)
    with pytest.raises(AccessDenied, match="not a trusted root"):
        verify_attestation(raw, root_certificates=[other_root.certificate], max_age=MAX_AGE, now=AT)


def test_a_document_signed_by_another_key_is_refused(
    root: Issued, intermediate: Issued, leaf: Issued
) -> None:
    with pytest.raises(AccessDenied, match="COSE signature does not verify"):
        _verify_chain(leaf, root, intermediate, signer=ec.generate_private_key(ec.SECP384R1()))


def test_a_certificate_that_does_not_parse_is_invalid(root: Issued, intermediate: Issued) -> None:
    document = _document(root, root, intermediate)
    broken = AttestationDocument(
        module_id=document.module_id,
        timestamp_ms=document.timestamp_ms,
        pcrs=document.pcrs,
        certificate=b"\x30\x03\x02\x01\x01",
        cabundle=document.cabundle,
    )
    raw = sign_document(broken, root.key)
    with pytest.raises(InvalidField, match="certificate is not a valid certificate"):
        verify_attestation(raw, root_certificates=[root.certificate], max_age=None, now=AT)
