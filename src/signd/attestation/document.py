"""The Nitro attestation document and its COSE_Sign1 envelope, parsed strictly, sans I/O.

A signed attestation document is a COSE_Sign1 structure (RFC 9052), untagged or with CBOR tag
18::

    [protected: bstr .cbor {1: -35}, unprotected: {}, payload: bstr, signature: bstr .size 96]

whose payload is the CBOR map described in aws-nitro-enclaves-nsm-api
``docs/attestation_process.md``::

    {module_id: tstr, digest: "SHA384", timestamp: uint (ms), pcrs: {0..31 => bstr .size 48},
     certificate: bstr (DER), cabundle: [+ bstr (DER)],
     ? public_key: bstr / null, ? user_data: bstr / null, ? nonce: bstr / null}

Parsing checks shape only: every violation (bad CBOR, trailing bytes, a missing, unknown or
mistyped field, a size over its limit) raises :class:`~signd.errors.InvalidField`. Nothing here
says a document is genuine; :func:`signd.attestation.verify.verify_attestation` does.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Final

import cbor2

from signd.errors import InvalidField

COSE_SIGN1_TAG: Final = 18
COSE_HEADER_ALG: Final = 1
COSE_ALG_ES384: Final = -35
ES384_SIGNATURE_SIZE: Final = 96
PROTECTED_HEADER_ES384: Final = cbor2.dumps({COSE_HEADER_ALG: COSE_ALG_ES384})

DIGEST_SHA384: Final = "SHA384"
PCR_SIZE: Final = 48
PCR_COUNT: Final = 32
MAX_DOCUMENT_SIZE: Final = 20 * 1024
MAX_PAYLOAD_SIZE: Final = 16 * 1024
MAX_CERTIFICATE_SIZE: Final = 1024
MAX_MODULE_ID_SIZE: Final = 256
MAX_USER_FIELD_SIZE: Final = 1024
"""Limit on ``public_key``, ``user_data`` and ``nonce`` (the CDDL's ``bytes .size (0..1024)``)."""
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

_MAX_DEPTH: Final = 4
_MAX_TIMESTAMP_MS: Final = (datetime(9999, 12, 31, tzinfo=UTC) - EPOCH) // timedelta(milliseconds=1)

_REQUIRED_FIELDS: Final = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle")
_OPTIONAL_FIELDS: Final = ("public_key", "user_data", "nonce")


def decode_cbor(data: bytes, *, what: str) -> Any:
    """Decode exactly one definite-length CBOR item with no duplicate map keys.

    Foreign decoding errors become :class:`InvalidField` naming ``what``.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidField(f"{what} must be bytes", field=what)
    stream = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(
            stream, max_depth=_MAX_DEPTH, allow_indefinite=False, allow_duplicate_keys=False
        ).decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError):
        raise InvalidField(f"{what} is not valid CBOR", field=what) from None
    if stream.tell() != len(data):
        raise InvalidField(f"{what} has trailing bytes after its CBOR item", field=what)
    return value


def _bytes(value: Any, name: str, *, min_size: int, max_size: int) -> bytes:
    if type(value) is not bytes:
        raise InvalidField(f"attestation: {name} must be a byte string", field=name)
    if not min_size <= len(value) <= max_size:
        raise InvalidField(
            f"attestation: {name} must be {min_size}..{max_size} bytes, not {len(value)}",
            field=name,
        )
    return value


def _optional_bytes(value: Any, name: str, *, min_size: int) -> bytes | None:
    if value is None:
        return None
    return _bytes(value, name, min_size=min_size, max_size=MAX_USER_FIELD_SIZE)


@dataclass(frozen=True, slots=True)
class CoseSign1:
    """A COSE_Sign1 structure restricted to what the NSM produces: ES384, headers protected."""

    protected: bytes
    payload: bytes
    signature: bytes

    def signed_bytes(self) -> bytes:
        """The Sig_structure the signature covers: ``["Signature1", protected, b"", payload]``."""
        return cbor2.dumps(["Signature1", self.protected, b"", self.payload])

    def encode(self) -> bytes:
        """The untagged CBOR array, byte for byte as the NSM emits it."""
        return cbor2.dumps([self.protected, {}, self.payload, self.signature])

    @classmethod
    def decode(cls, data: bytes) -> CoseSign1:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidField("attestation: document must be bytes", field="document")
        if len(data) > MAX_DOCUMENT_SIZE:
            raise InvalidField(
                f"attestation: document is larger than {MAX_DOCUMENT_SIZE} bytes",
                field="document",
            )
        item = decode_cbor(bytes(data), what="document")
        if isinstance(item, cbor2.CBORTag):
            if item.tag != COSE_SIGN1_TAG:
                raise InvalidField(
                    f"attestation: CBOR tag {item.tag} is not COSE_Sign1", field="document"
                )
            item = item.value
        if not isinstance(item, list | tuple) or len(item) != 4:
            raise InvalidField(
                "attestation: COSE_Sign1 must be an array of 4 items", field="document"
            )
        protected, unprotected, payload, signature = item
        if type(protected) is not bytes or protected != PROTECTED_HEADER_ES384:
            raise InvalidField(
                "attestation: protected header must be exactly {1: -35} (alg ES384)",
                field="protected",
            )
        if not isinstance(unprotected, Mapping) or unprotected:
            raise InvalidField(
                "attestation: unprotected header must be an empty map", field="unprotected"
            )
        payload = _bytes(payload, "payload", min_size=1, max_size=MAX_PAYLOAD_SIZE)
        signature = _bytes(
            signature, "signature", min_size=ES384_SIGNATURE_SIZE, max_size=ES384_SIGNATURE_SIZE
        )
        return cls(protected=protected, payload=payload, signature=signature)


@dataclass(frozen=True, slots=True)
class AttestationDocument:
    """The payload of a Nitro attestation document. ``pcrs`` is read-only."""

    module_id: str
    timestamp_ms: int
    pcrs: Mapping[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None = None
    user_data: bytes | None = None
    nonce: bytes | None = None
    digest: str = DIGEST_SHA384

    def __post_init__(self) -> None:
        object.__setattr__(self, "pcrs", MappingProxyType(dict(self.pcrs)))

    @property
    def timestamp(self) -> datetime:
        """When the NSM created the document (UTC)."""
        return EPOCH + timedelta(milliseconds=self.timestamp_ms)

    def encode(self) -> bytes:
        """The CBOR payload in the NSM's field order, absent optional fields as null."""
        return cbor2.dumps(
            {
                "module_id": self.module_id,
                "digest": self.digest,
                "timestamp": self.timestamp_ms,
                "pcrs": dict(sorted(self.pcrs.items())),
                "certificate": self.certificate,
                "cabundle": list(self.cabundle),
                "public_key": self.public_key,
                "user_data": self.user_data,
                "nonce": self.nonce,
            }
        )

    @classmethod
    def decode(cls, payload: bytes) -> AttestationDocument:
        """Parse and type-check a payload; any deviation raises :class:`InvalidField`."""
        body = decode_cbor(payload, what="payload")
        if not isinstance(body, Mapping):
            raise InvalidField("attestation: payload must be a CBOR map", field="payload")
        unknown = [key for key in body if key not in _REQUIRED_FIELDS + _OPTIONAL_FIELDS]
        if unknown:
            raise InvalidField(
                f"attestation: unknown field {unknown[0]!r} in payload", field="payload"
            )
        for name in _REQUIRED_FIELDS:
            if name not in body:
                raise InvalidField(f"attestation: payload has no {name}", field=name)

        module_id = body["module_id"]
        if type(module_id) is not str or not 0 < len(module_id) <= MAX_MODULE_ID_SIZE:
            raise InvalidField(
                f"attestation: module_id must be a text string of 1..{MAX_MODULE_ID_SIZE}",
                field="module_id",
            )
        if body["digest"] != DIGEST_SHA384 or type(body["digest"]) is not str:
            raise InvalidField("attestation: digest must be 'SHA384'", field="digest")
        timestamp = body["timestamp"]
        if type(timestamp) is not int or not 0 < timestamp <= _MAX_TIMESTAMP_MS:
            raise InvalidField(
                "attestation: timestamp must be milliseconds since 1970 before year 9999",
                field="timestamp",
            )
        return cls(
            module_id=module_id,
            timestamp_ms=timestamp,
            pcrs=_parse_pcrs(body["pcrs"]),
            certificate=_bytes(
                body["certificate"], "certificate", min_size=1, max_size=MAX_CERTIFICATE_SIZE
            ),
            cabundle=_parse_cabundle(body["cabundle"]),
            public_key=_optional_bytes(body.get("public_key"), "public_key", min_size=1),
            user_data=_optional_bytes(body.get("user_data"), "user_data", min_size=0),
            nonce=_optional_bytes(body.get("nonce"), "nonce", min_size=0),
        )


def _parse_pcrs(pcrs: Any) -> dict[int, bytes]:
    if not isinstance(pcrs, Mapping) or not 0 < len(pcrs) <= PCR_COUNT:
        raise InvalidField(f"attestation: pcrs must be a map of 1..{PCR_COUNT}", field="pcrs")
    parsed: dict[int, bytes] = {}
    for index, value in pcrs.items():
        if type(index) is not int or not 0 <= index < PCR_COUNT:
            raise InvalidField(
                f"attestation: PCR index must be an integer 0..{PCR_COUNT - 1}", field="pcrs"
            )
        parsed[index] = _bytes(value, f"PCR{index}", min_size=PCR_SIZE, max_size=PCR_SIZE)
    return parsed


def _parse_cabundle(cabundle: Any) -> tuple[bytes, ...]:
    if not isinstance(cabundle, list | tuple) or not cabundle:
        raise InvalidField("attestation: cabundle must be a non-empty array", field="cabundle")
    return tuple(
        _bytes(der, f"cabundle[{i}]", min_size=1, max_size=MAX_CERTIFICATE_SIZE)
        for i, der in enumerate(cabundle)
    )
