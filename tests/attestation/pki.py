"""A small certificate factory for chain tests: certificates with chosen flaws."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from signd.attestation.document import PROTECTED_HEADER_ES384, AttestationDocument, CoseSign1


@dataclass
class Issued:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)


def issue(
    name: str,
    *,
    issuer: Issued | None,
    at: datetime,
    ca: bool,
    path_length: int | None = None,
    cert_sign: bool | None = None,
    digital_signature: bool = True,
    lifetime: timedelta = timedelta(days=1),
    not_before: datetime | None = None,
    curve: ec.EllipticCurve | None = None,
    hash_algorithm: hashes.SHA256 | hashes.SHA384 | None = None,
) -> Issued:
    """A certificate for ``name``; self-signed when ``issuer`` is None."""
    key = ec.generate_private_key(curve or ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = not_before or at - timedelta(hours=1)
    signer = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + lifetime)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=digital_signature,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca if cert_sign is None else cert_sign,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    return Issued(builder.sign(signer, hash_algorithm or hashes.SHA384()), key)


def sign_document(document: AttestationDocument, key: ec.EllipticCurvePrivateKey) -> bytes:
    """Sign a document exactly as the NSM would (ES384, raw r‖s)."""
    unsigned = CoseSign1(PROTECTED_HEADER_ES384, document.encode(), b"")
    r, s = decode_dss_signature(key.sign(unsigned.signed_bytes(), ec.ECDSA(hashes.SHA384())))
    return CoseSign1(
        unsigned.protected, unsigned.payload, r.to_bytes(48, "big") + s.to_bytes(48, "big")
    ).encode()
