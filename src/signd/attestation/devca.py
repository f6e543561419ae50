"""The local development CA behind the simulated NSM, shaped like the AWS Nitro PKI.

Created on first use under a directory (mode 0700)::

    root.pem          self-signed root CA, P-384, the trust anchor for simulated documents
    root.key          its private key (0600)
    intermediate.pem  CA issued by the root, path length 0
    intermediate.key  its private key (0600)

Each simulated NSM boot gets its own leaf from the intermediate, with a key that lives only in
memory, so documents carry ``cabundle = [root, intermediate]`` and a leaf, as AWS's do (theirs
have more intermediates). Development only: the CA keys sit unencrypted on disk, and whoever
reads them can forge documents that verify against the development root.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import stat
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from signd.errors import ConfigurationError

ROOT_CERTIFICATE_FILE: Final = "root.pem"
CA_LIFETIME: Final = timedelta(days=3650)
LEAF_LIFETIME: Final = timedelta(hours=3)
_CLOCK_SLACK: Final = timedelta(minutes=5)
_ORGANIZATION: Final = "signd development"


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A certificate together with its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


class DevCertificateAuthority:
    """The root and intermediate of the development PKI; issues per-boot leaves."""

    def __init__(self, root: IssuedCertificate, intermediate: IssuedCertificate) -> None:
        self.root = root
        self.intermediate = intermediate

    @property
    def root_certificate(self) -> x509.Certificate:
        return self.root.certificate

    @classmethod
    def open(cls, directory: Path, *, now: datetime) -> DevCertificateAuthority:
        """Load the CA from ``directory``, creating it there first if it does not exist."""
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(directory / ".lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if (directory / ROOT_CERTIFICATE_FILE).exists():
                    return cls(_load(directory, "root"), _load(directory, "intermediate"))
                authority = cls.create(now=now)
                _store(directory, "intermediate", authority.intermediate)
                _store(directory, "root", authority.root)
                return authority
        except OSError as exc:
            raise ConfigurationError(
                f"attestation: cannot open the development CA in {directory}: {exc.strerror}"
            ) from None

    @classmethod
    def create(cls, *, now: datetime) -> DevCertificateAuthority:
        """A new root and intermediate, in memory."""
        root_key = ec.generate_private_key(ec.SECP384R1())
        root_name = _name("signd-dev.nitro-enclaves")
        root = _sign(
            _builder(root_name, root_key.public_key(), now - _CLOCK_SLACK, now + CA_LIFETIME)
            .issuer_name(root_name)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True),
            root_key,
        )
        intermediate_key = ec.generate_private_key(ec.SECP384R1())
        intermediate = _sign(
            _builder(
                _name(f"{secrets.token_hex(8)}.signd-dev.nitro-enclaves"),
                intermediate_key.public_key(),
                now - _CLOCK_SLACK,
                now + CA_LIFETIME,
            )
            .issuer_name(root_name)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(_authority_key_id(root_key), critical=False),
            root_key,
        )
        return cls(
            IssuedCertificate(root, root_key), IssuedCertificate(intermediate, intermediate_key)
        )

    def issue_leaf(self, common_name: str, *, now: datetime) -> IssuedCertificate:
        """A fresh signing certificate for one boot, valid from ``now`` for LEAF_LIFETIME."""
        key = ec.generate_private_key(ec.SECP384R1())
        certificate = _sign(
            _builder(_name(common_name), key.public_key(), now, now + LEAF_LIFETIME)
            .issuer_name(self.intermediate.certificate.subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(_authority_key_id(self.intermediate.key), critical=False),
            self.intermediate.key,
        )
        return IssuedCertificate(certificate, key)


def load_dev_root(directory: Path) -> x509.Certificate:
    """The development root certificate alone: the trust anchor a verifier configures."""
    path = directory / ROOT_CERTIFICATE_FILE
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise ConfigurationError(
            f"attestation: no development CA in {directory} (start the simulated NSM first)"
        ) from None
    except (OSError, ValueError):
        raise ConfigurationError(f"attestation: cannot read {path}") from None


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "signd"),
        ]
    )


def _builder(
    subject: x509.Name, key: ec.EllipticCurvePublicKey, not_before: datetime, not_after: datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_id(issuer_key: ec.EllipticCurvePrivateKey) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())


def _sign(builder: x509.CertificateBuilder, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    return builder.sign(key, hashes.SHA384())


def _store(directory: Path, stem: str, issued: IssuedCertificate) -> None:
    """Write the key (0600) before the certificate, each atomically by rename."""
    key_pem = issued.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomically(directory / f"{stem}.key", key_pem, mode=0o600)
    _write_atomically(
        directory / f"{stem}.pem",
        issued.certificate.public_bytes(serialization.Encoding.PEM),
        mode=0o644,
    )


def _write_atomically(path: Path, data: bytes, *, mode: int) -> None:
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), mode)
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _load(directory: Path, stem: str) -> IssuedCertificate:
    key_path = directory / f"{stem}.key"
    if stat.S_IMODE(key_path.stat().st_mode) & 0o077:
        raise ConfigurationError(
            f"attestation: {key_path} is readable by others; it must be mode 0600"
        )
    try:
        certificate = x509.load_pem_x509_certificate((directory / f"{stem}.pem").read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigurationError(f"attestation: {directory}/{stem} is not a valid CA") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or (
        key.public_key() != certificate.public_key()
    ):
        raise ConfigurationError(f"attestation: {key_path} does not match {stem}.pem")
    return IssuedCertificate(certificate, key)
