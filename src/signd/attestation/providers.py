"""Where attestation documents come from: the Nitro Secure Module, or a simulation of it.

Both providers return the same bytes format (an untagged COSE_Sign1 over the CBOR document),
so :func:`signd.attestation.verify.verify_attestation` is the only verifier; what differs is
the trust anchor: the AWS Nitro root for :class:`NsmProvider`, the development root for
:class:`SimulatedNsm`.

The NSM is driven through ``/dev/nsm`` with the driver's one ioctl, ``NSM_IOCTL_RAW =
_IOWR(0x0A, 0, struct nsm_raw)``, where ``struct nsm_raw`` holds two ``{u64 addr; u64 len}``
iovecs: the CBOR request, and a response buffer whose ``len`` the driver rewrites to the bytes
written (Linux ``include/uapi/linux/nsm.h``; aws-nitro-enclaves-nsm-api ``src/driver``). The
request and response are serde's externally tagged enums in CBOR::

    {"Attestation": {"user_data": bstr / null, "nonce": bstr / null, "public_key": bstr / null}}
    {"Attestation": {"document": bstr}}   or   {"Error": "InvalidArgument" / ...}

A missing or unopenable device is a :class:`~signd.errors.ConfigurationError` (this is not an
enclave); a failed ioctl, an NSM ``Error`` or a malformed answer is
:class:`~signd.errors.DependencyUnavailable`.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import secrets
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from signd.attestation.devca import DevCertificateAuthority, IssuedCertificate
from signd.attestation.document import (
    EPOCH,
    ES384_SIGNATURE_SIZE,
    MAX_USER_FIELD_SIZE,
    PCR_SIZE,
    PROTECTED_HEADER_ES384,
    AttestationDocument,
    CoseSign1,
    decode_cbor,
)
from signd.attestation.measurement import PACKAGE_ROOT, measure
from signd.errors import ConfigurationError, DependencyUnavailable, InvalidField

NSM_DEVICE: Final = Path("/dev/nsm")
NSM_REQUEST_MAX_SIZE: Final = 0x1000
NSM_RESPONSE_MAX_SIZE: Final = 0x3000
NSM_MESSAGE: Final = struct.Struct("=QQQQ")
"""``struct nsm_raw``: request ``{addr, len}`` then response ``{addr, len}``, all ``__u64``."""
SIMULATED_PCR_COUNT: Final = 16
_LEAF_RENEWAL: Final = timedelta(minutes=5)


def _ioctl_readwrite(kind: int, number: int, size: int) -> int:
    """Linux ``_IOWR(kind, number, size)`` (the asm-generic encoding of x86-64 and arm64)."""
    return (3 << 30) | (size << 16) | (kind << 8) | number


NSM_IOCTL_RAW: Final = _ioctl_readwrite(0x0A, 0, NSM_MESSAGE.size)


class AttestationProvider(ABC):
    """Produces signed attestation documents binding optional user data, nonce and key."""

    def attest(
        self,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes:
        """A COSE_Sign1 attestation document; each optional field is at most 1024 bytes."""
        for name, value in (("user_data", user_data), ("nonce", nonce), ("public_key", public_key)):
            if value is not None and (
                not isinstance(value, bytes) or len(value) > MAX_USER_FIELD_SIZE
            ):
                raise InvalidField(
                    f"attestation: {name} must be at most {MAX_USER_FIELD_SIZE} bytes", field=name
                )
        if public_key == b"":
            raise InvalidField("attestation: public_key must not be empty", field="public_key")
        return self._attest(user_data, nonce, public_key)

    @abstractmethod
    def _attest(
        self, user_data: bytes | None, nonce: bytes | None, public_key: bytes | None
    ) -> bytes: ...


def encode_attestation_request(
    user_data: bytes | None, nonce: bytes | None, public_key: bytes | None
) -> bytes:
    """The CBOR ``Attestation`` request the NSM expects."""
    request = cbor2.dumps(
        {"Attestation": {"user_data": user_data, "nonce": nonce, "public_key": public_key}}
    )
    if len(request) > NSM_REQUEST_MAX_SIZE:
        raise InvalidField(f"nsm: request is larger than {NSM_REQUEST_MAX_SIZE} bytes")
    return request


def decode_attestation_response(response: bytes) -> bytes:
    """The document out of an NSM ``Attestation`` response; an NSM ``Error`` raises."""
    try:
        body: Any = decode_cbor(response, what="nsm response")
    except InvalidField:
        raise DependencyUnavailable("nsm: response is not valid CBOR") from None
    if isinstance(body, Mapping) and len(body) == 1:
        if isinstance(body.get("Error"), str):
            raise DependencyUnavailable(f"nsm: attestation failed: {body['Error']}")
        answer = body.get("Attestation")
        if isinstance(answer, Mapping) and set(answer) == {"document"}:
            document = answer["document"]
            if type(document) is bytes and document:
                return document
    raise DependencyUnavailable("nsm: response is not an attestation answer")


class NsmProvider(AttestationProvider):
    """The Nitro Secure Module of the enclave this process runs in."""

    def __init__(self, device: Path = NSM_DEVICE) -> None:
        try:
            self._fd: int | None = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ConfigurationError(
                f"attestation: {device} does not exist; this is not a Nitro Enclave "
                "(use the simulated NSM outside one)"
            ) from None
        except OSError as exc:
            raise ConfigurationError(f"attestation: cannot open {device}: {exc.strerror}") from None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> NsmProvider:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _attest(
        self, user_data: bytes | None, nonce: bytes | None, public_key: bytes | None
    ) -> bytes:
        request = encode_attestation_request(user_data, nonce, public_key)
        return decode_attestation_response(self._call(request))

    def _call(self, request: bytes) -> bytes:
        """One NSM_IOCTL_RAW round trip."""
        request_buffer = ctypes.create_string_buffer(request, len(request))
        response_buffer = ctypes.create_string_buffer(NSM_RESPONSE_MAX_SIZE)
        message = bytearray(
            NSM_MESSAGE.pack(
                ctypes.addressof(request_buffer),
                len(request),
                ctypes.addressof(response_buffer),
                NSM_RESPONSE_MAX_SIZE,
            )
        )
        with self._lock:
            if self._fd is None:
                raise DependencyUnavailable("nsm: the device is closed")
            try:
                fcntl.ioctl(self._fd, NSM_IOCTL_RAW, message, True)
            except OSError as exc:
                raise DependencyUnavailable(f"nsm: ioctl failed: {exc.strerror}") from None
        written = NSM_MESSAGE.unpack(message)[3]
        if not 0 < written <= NSM_RESPONSE_MAX_SIZE:
            raise DependencyUnavailable(f"nsm: driver reported a {written}-byte response")
        return response_buffer.raw[:written]


class SimulatedNsm(AttestationProvider):
    """An NSM stand-in for development: same document format, signed by a local dev CA.

    PCR0/1/2 are :func:`~signd.attestation.measurement.measure` of the code, runtime and
    ``config`` at construction (a boot); PCR3..15 are zero. Each instance has its own
    module id and leaf certificate, renewed when it nears expiry.
    """

    def __init__(
        self,
        directory: Path,
        *,
        config: bytes = b"",
        package_root: Path = PACKAGE_ROOT,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._clock = clock or (lambda: datetime.now(UTC))
        self._authority = DevCertificateAuthority.open(directory, now=self._clock())
        self.module_id = f"sim-{secrets.token_hex(8)}-enc{secrets.token_hex(8)}"
        self.pcrs: Mapping[int, bytes] = {
            index: bytes(PCR_SIZE) for index in range(SIMULATED_PCR_COUNT)
        } | measure(config, package_root=package_root)
        self._lock = threading.Lock()
        self._leaf: IssuedCertificate | None = None

    @property
    def root_certificate(self) -> x509.Certificate:
        """The trust anchor to verify this provider's documents with."""
        return self._authority.root_certificate

    def _attest(
        self, user_data: bytes | None, nonce: bytes | None, public_key: bytes | None
    ) -> bytes:
        now = self._clock()
        leaf = self._current_leaf(now)
        document = AttestationDocument(
            module_id=self.module_id,
            timestamp_ms=(now - EPOCH) // timedelta(milliseconds=1),
            pcrs=self.pcrs,
            certificate=leaf.certificate.public_bytes(serialization.Encoding.DER),
            cabundle=tuple(
                issued.certificate.public_bytes(serialization.Encoding.DER)
                for issued in (self._authority.root, self._authority.intermediate)
            ),
            public_key=public_key,
            user_data=user_data,
            nonce=nonce,
        )
        unsigned = CoseSign1(PROTECTED_HEADER_ES384, document.encode(), b"")
        r, s = decode_dss_signature(
            leaf.key.sign(unsigned.signed_bytes(), ec.ECDSA(hashes.SHA384()))
        )
        half = ES384_SIGNATURE_SIZE // 2
        signature = r.to_bytes(half, "big") + s.to_bytes(half, "big")
        return CoseSign1(unsigned.protected, unsigned.payload, signature).encode()

    def _current_leaf(self, now: datetime) -> IssuedCertificate:
        with self._lock:
            leaf = self._leaf
            if (
                leaf is None
                or now < leaf.certificate.not_valid_before_utc
                or now + _LEAF_RENEWAL > leaf.certificate.not_valid_after_utc
            ):
                leaf = self._authority.issue_leaf(f"{self.module_id}.signd-dev", now=now)
                self._leaf = leaf
            return leaf
