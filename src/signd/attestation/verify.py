"""The one verifier for attestation documents, real (AWS Nitro) and simulated alike.

:func:`verify_attestation` runs these checks in order, and answers each failure with one error
class so callers need catch only that:

1. shape: COSE_Sign1 with ES384, payload fields, types and sizes, certificates that parse →
   :class:`~signd.errors.InvalidField` (the input is not an attestation document at all);
2. chain: ``cabundle[0]`` is one of the configured roots, every later certificate and then the
   leaf is directly issued by its predecessor (P-384, ECDSA-SHA384, CA and key-usage bits, path
   length), each valid at the document's own timestamp;
3. signature: the COSE ES384 signature over the Sig_structure verifies with the leaf key;
4. freshness: the nonce equals the expected one; the timestamp is within ``max_age`` of ``now``;
5. measurements: each expected PCR is present and equal (constant-time).

Checks 2-5 raise :class:`~signd.errors.AccessDenied` with a message naming the check
("attestation: PCR0 does not match"). AccessDenied, not InvalidSignature or IntegrityError,
because the outcome is an authorisation decision: a well-formed document that fails is a
refusal to trust the enclave behind it (HTTP 403), not a malformed request (400) nor a
corrupted stored record. Arguments that are wrong on the caller's side (no roots, an expected
PCR of the wrong size, a naive ``now``) raise :class:`~signd.errors.ConfigurationError`.

Certificate validity is evaluated at the document's timestamp, and freshness separately
against ``now``: together they bound how old a certificate may be when it is relied on.
``max_age=None`` turns the freshness bound off (only for replaying recorded documents).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Final, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import SignatureAlgorithmOID

from signd.attestation.document import (
    ES384_SIGNATURE_SIZE,
    PCR_COUNT,
    PCR_SIZE,
    AttestationDocument,
    CoseSign1,
)
from signd.errors import AccessDenied, ConfigurationError, InvalidField

AWS_NITRO_ROOT_G1_PEM: Final = b"""-----BEGIN CERTIFICATE-----
MIICETCCAZagAwIBAgIRAPkxdWgbkK/hHUbMtOTn+FYwCgYIKoZIzj0EAwMwSTEL
MAkGA1UEBhMCVVMxDzANBgNVBAoMBkFtYXpvbjEMMAoGA1UECwwDQVdTMRswGQYD
VQQDDBJhd3Mubml0cm8tZW5jbGF2ZXMwHhcNMTkxMDI4MTMyODA1WhcNNDkxMDI4
MTQyODA1WjBJMQswCQYDVQQGEwJVUzEPMA0GA1UECgwGQW1hem9uMQwwCgYDVQQL
DANBV1MxGzAZBgNVBAMMEmF3cy5uaXRyby1lbmNsYXZlczB2MBAGByqGSM49AgEG
BSuBBAAiA2IABPwCVOumCMHzaHDimtqQvkY4MpJzbolL//Zy2YlES1BR5TSksfbb
48C8WBoyt7F2Bw7eEtaaP+ohG2bnUs990d0JX28TcPQXCEPZ3BABIeTPYwEoCWZE
h8l5YoQwTcU/9KNCMEAwDwYDVR0TAQH/BAUwAwEB/zAdBgNVHQ4EFgQUkCW1DdkF
R+eWw5b6cp3PmanfS5YwDgYDVR0PAQH/BAQDAgGGMAoGCCqGSM49BAMDA2kAMGYC
MQCjfy+Rocm9Xue4YnwWmNJVA44fA0P5W2OpYow9OYCVRaEevL8uO1XYru5xtMPW
rfMCMQCi85sWBbJwKKXdS6BptQFuZbT73o/gBh1qUxl/nNr12UO8Yfwr6wPLb+6N
IwLz3/Y=
-----END CERTIFICATE-----
"""
"""The AWS Nitro Enclaves Root-G1 CA (SHA-256 fingerprint 641a0321…f79bb5b), from
https://aws-nitro-enclaves.amazonaws.com/AWS_NitroEnclaves_Root-G1.zip."""

_ExtensionT = TypeVar("_ExtensionT", bound=x509.ExtensionType)


def aws_nitro_root_certificate() -> x509.Certificate:
    """The trust anchor for documents from real Nitro Enclaves."""
    return x509.load_pem_x509_certificate(AWS_NITRO_ROOT_G1_PEM)


def load_root_certificates(pem: bytes) -> list[x509.Certificate]:
    """Parse one or more PEM certificates to use as trust anchors."""
    try:
        roots = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ConfigurationError("attestation: root certificate file is not valid PEM") from None
    return roots


def verify_attestation(
    document: bytes,
    *,
    root_certificates: Sequence[x509.Certificate],
    expected_pcrs: Mapping[int, bytes] | None = None,
    nonce: bytes | None = None,
    max_age: timedelta | None,
    now: datetime | None = None,
) -> AttestationDocument:
    """Verify a signed attestation document and return its payload (see the module doc)."""
    if not root_certificates:
        raise ConfigurationError("attestation: no root certificates are configured")
    expected = _check_expected_pcrs(expected_pcrs or {})
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        raise ConfigurationError("attestation: now must be timezone-aware")
    if max_age is not None and max_age < timedelta(0):
        raise ConfigurationError("attestation: max_age must not be negative")

    envelope = CoseSign1.decode(document)
    attested = AttestationDocument.decode(envelope.payload)
    leaf_key = _verify_chain(attested, root_certificates)
    _verify_signature(envelope, leaf_key)
    _verify_freshness(attested, nonce=nonce, max_age=max_age, now=now)
    _verify_pcrs(attested, expected)
    return attested


def _check_expected_pcrs(expected: Mapping[int, bytes]) -> dict[int, bytes]:
    for index, value in expected.items():
        if type(index) is not int or not 0 <= index < PCR_COUNT:
            raise ConfigurationError(f"attestation: {index!r} is not a PCR index")
        if not isinstance(value, bytes) or len(value) != PCR_SIZE:
            raise ConfigurationError(f"attestation: expected PCR{index} must be {PCR_SIZE} bytes")
    return dict(expected)


def _load_certificate(der: bytes, name: str) -> x509.Certificate:
    """Parse a DER certificate and touch every lazily parsed part the checks read."""
    try:
        certificate = x509.load_der_x509_certificate(der)
        _ = certificate.extensions, certificate.not_valid_before_utc, certificate.public_key()
        _ = certificate.not_valid_after_utc, certificate.signature_algorithm_oid
    except (
        ValueError,
        TypeError,
        UnsupportedAlgorithm,
        x509.DuplicateExtension,
        x509.InvalidVersion,
        x509.UnsupportedGeneralNameType,
    ):
        raise InvalidField(f"attestation: {name} is not a valid certificate", field=name) from None
    return certificate


def _extension(certificate: x509.Certificate, kind: type[_ExtensionT]) -> _ExtensionT | None:
    try:
        return certificate.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _verify_chain(
    attested: AttestationDocument, roots: Sequence[x509.Certificate]
) -> ec.EllipticCurvePublicKey:
    """Check the path root → cabundle[1:] → leaf and return the leaf's public key."""
    root_ders = {root.public_bytes(serialization.Encoding.DER) for root in roots}
    if attested.cabundle[0] not in root_ders:
        raise AccessDenied("attestation: cabundle[0] is not a trusted root certificate")
    names = [f"cabundle[{i}]" for i in range(len(attested.cabundle))] + ["certificate"]
    path = [
        _load_certificate(der, name)
        for der, name in zip((*attested.cabundle, attested.certificate), names, strict=True)
    ]
    at = attested.timestamp
    for position, (certificate, name) in enumerate(zip(path, names, strict=True)):
        _p384_key(certificate, name)
        if not certificate.not_valid_before_utc <= at <= certificate.not_valid_after_utc:
            raise AccessDenied(f"attestation: {name} is not valid at the document timestamp")
        if position > 0:
            issuer_name = names[position - 1]
            try:
                certificate.verify_directly_issued_by(path[position - 1])
            except (ValueError, TypeError, InvalidSignature):
                raise AccessDenied(f"attestation: {name} is not issued by {issuer_name}") from None
        if position < len(path) - 1:
            _check_ca(certificate, name, cas_below=len(path) - 2 - position)
        else:
            _check_leaf(certificate, name)
    return _p384_key(path[-1], names[-1])


def _p384_key(certificate: x509.Certificate, name: str) -> ec.EllipticCurvePublicKey:
    key = certificate.public_key()
    if not (
        isinstance(key, ec.EllipticCurvePublicKey)
        and isinstance(key.curve, ec.SECP384R1)
        and certificate.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA384
    ):
        raise AccessDenied(f"attestation: {name} is not a P-384 ECDSA-SHA384 certificate")
    return key


def _check_ca(certificate: x509.Certificate, name: str, *, cas_below: int) -> None:
    constraints = _extension(certificate, x509.BasicConstraints)
    if constraints is None or not constraints.ca:
        raise AccessDenied(f"attestation: {name} is not a CA certificate")
    if constraints.path_length is not None and cas_below > constraints.path_length:
        raise AccessDenied(f"attestation: {name} path length constraint is exceeded")
    usage = _extension(certificate, x509.KeyUsage)
    if usage is None or not usage.key_cert_sign:
        raise AccessDenied(f"attestation: {name} may not sign certificates")


def _check_leaf(certificate: x509.Certificate, name: str) -> None:
    constraints = _extension(certificate, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise AccessDenied(f"attestation: {name} must not be a CA certificate")
    usage = _extension(certificate, x509.KeyUsage)
    if usage is None or not usage.digital_signature:
        raise AccessDenied(f"attestation: {name} may not sign documents")


def _verify_signature(envelope: CoseSign1, key: ec.EllipticCurvePublicKey) -> None:
    half = ES384_SIGNATURE_SIZE // 2
    r = int.from_bytes(envelope.signature[:half], "big")
    s = int.from_bytes(envelope.signature[half:], "big")
    try:
        key.verify(encode_dss_signature(r, s), envelope.signed_bytes(), ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise AccessDenied("attestation: COSE signature does not verify") from None


def _verify_freshness(
    attested: AttestationDocument,
    *,
    nonce: bytes | None,
    max_age: timedelta | None,
    now: datetime,
) -> None:
    if nonce is not None and (
        attested.nonce is None or not hmac.compare_digest(attested.nonce, nonce)
    ):
        raise AccessDenied("attestation: nonce does not match")
    if max_age is None:
        return
    age = now - attested.timestamp
    if age > max_age:
        raise AccessDenied(f"attestation: document is stale ({age} old, max_age {max_age})")
    if -age > max_age:
        raise AccessDenied("attestation: document timestamp is in the future")


def _verify_pcrs(attested: AttestationDocument, expected: Mapping[int, bytes]) -> None:
    for index, value in sorted(expected.items()):
        actual = attested.pcrs.get(index)
        if actual is None:
            raise AccessDenied(f"attestation: PCR{index} is missing")
        if not hmac.compare_digest(actual, value):
            raise AccessDenied(f"attestation: PCR{index} does not match")
