"""The host↔enclave wire protocol: length-prefixed binary frames with CBOR payloads, sans I/O.

Every frame starts with the same 16-byte header in every protocol version, so that a peer can
always read enough of a frame it does not understand to answer it::

    offset  size  field
    0       4     magic  b"SGND"
    4       1     protocol version
    5       1     message type (:class:`MessageType`)
    6       2     flags (:class:`Flag`; reserved bits must be zero)
    8       4     request id (u32; 0 is reserved for errors about the connection itself)
    12      4     payload length (u32)
    16      n     payload: one CBOR map with text keys

All integers are big-endian. HELLO is always sent as version 1, which every peer reads, and
settles the version of the frames that follow. Version 2 added ``custody`` to CREATE_KEYS,
SIGN_DIGEST(S) and HEALTH: ``"enclave"`` (sealed keys, the default and all version 1 knows) or
``"hsm"`` (a PKCS#11 token the enclave reaches through the outbound proxy).

A response carries the request's id and type with ``Flag.RESPONSE`` set, or type ``ERROR`` with
body ``{code, message[, field]}`` using the codes of :mod:`signd.errors`. Request ids let a
client pipeline many requests on one connection.

:class:`FrameDecoder` is fed bytes and returns events: a :class:`Frame`, or a
:class:`ProtocolViolation`. A violation that leaves the stream in step (unknown version or
message type, bad flags, a payload that is not a CBOR map) names the request it concerns and
the stream goes on; a fatal one (bad magic, a declared length over the limit) is the last event
and the connection should be answered with an error frame and closed. A declared length is
checked against the limit before any byte of the payload is buffered.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Any, Final

import cbor2

from signd import errors
from signd.custody.base import check_labels
from signd.errors import InvalidField, InvalidRequest, SigndError, UnsupportedOperation

MAGIC: Final = b"SGND"
PROTOCOL_VERSION: Final = 2
"""The newest version this side speaks."""
HELLO_VERSION: Final = 1
"""The version HELLO frames are sent in, so that an enclave of any version can answer them."""
CUSTODY_VERSION: Final = 2
"""The first version whose requests may name a custody."""
SUPPORTED_VERSIONS: Final = frozenset({1, 2})
CUSTODY_ENCLAVE: Final = "enclave"
"""Keys sealed under KMS data keys, held in blobs (the default)."""
CUSTODY_HSM: Final = "hsm"
"""Keys on a PKCS#11 token the enclave logs in to."""
CUSTODIES: Final = (CUSTODY_ENCLAVE, CUSTODY_HSM)
HEADER: Final = struct.Struct(">4sBBHII")
HEADER_SIZE: Final = HEADER.size
DEFAULT_MAX_FRAME_SIZE: Final = 1 << 20
MAX_ANSWER_FRAME_SIZE: Final = 16 << 20
"""The largest answer frame the enclave sends and the host reads, whatever the request limit
(``max_frame_size``): a GATE answer to a key creation carries each key made and its sealed
audit record, about 1 KiB a key (6 KiB with labels at their limits), so a creation of the
API's 1000 keys does not fit in a request-sized frame. The enclave is the trusted end: the
limit on what the host reads only bounds its buffering."""
MIN_FRAME_SIZE: Final = 4096
NO_REQUEST_ID: Final = 0
U32_MAX: Final = 0xFFFF_FFFF
MAX_PAYLOAD_DEPTH: Final = 16


class MessageType(IntEnum):
    HELLO = 1
    """``{versions: [int]}`` → ``{version, max_frame_size, max_batch, custody: [name]}``."""
    HEALTH = 2
    """``{[custody]}`` → ``{status: "ok", cached_keys}``; an error frame when a dependency is
    down."""
    CREATE_KEYS = 3
    """``{chain, count[, labels]}`` → ``{keys: [{key_id, chain, address, public_key, blob[,
    labels]}]}`` (each key's blob binds ``labels``, see :func:`canonical_labels`);
    ``{chain, count, custody: "hsm"}`` → ``{keys: [{key_id, chain, address, public_key, cka_id,
    label}][, error]}`` (keys made before a failure come back with the error)."""
    SIGN_DIGEST = 4
    """``{key_id, chain, address, blob[, labels], digest}`` → ``{signature}`` (65 bytes
    r‖s‖recid; only if ``labels``, absent meaning none, are those the key's blob binds);
    ``{custody: "hsm", key_id, cka_id, digest}`` → ``{signature}`` (64 bytes r‖s as the token
    made it, possibly high-S: the host normalises it against the public key it recorded)."""
    SIGN_DIGESTS = 5
    """``{items: [sign request]}`` → ``{results: [{signature} | {error: {code, message}}]}``;
    each item names its own custody."""
    FLUSH_CACHE = 6
    """``{}`` → ``{flushed}``: drop every unsealed key held in enclave memory."""
    ATTESTATION = 7
    """``{nonce}`` (1-64 bytes) → ``{document}``: a fresh COSE_Sign1 attestation document from
    the enclave's NSM with that nonce and the enclave's ``user_data`` (no ``public_key``); an
    enclave without an attestation provider answers ``unsupported_operation``."""
    GATE = 8
    """``{request: {method, target, body, headers}, keys: [{ref, key_id, chain, address,
    public_key, custody, labels[, blob]}], fills: {origin: {field: value}}[, select:
    [origin]]}`` → ``{principal?, outcomes: [{signature, digest} | {approved: digest} |
    {created: n} | {error}], keys: [created key], audit: [sealed record JSON][, error]}``:
    the enclave's gate (:mod:`signd.enclave.gate`) authenticates the request as received,
    derives its calls from its body and performs those ``select`` names (none: authenticate
    only). Refusals are answers, not error frames, because their audit records come along."""
    GATE_CONFIGURE = 9
    """``{clients, policy, audit_key, audit_head[, audit_tail, resume, node, max_batch,
    max_keys_per_request]}`` → ``{clients_sha256, policy_sha256, seq, windows_ready[,
    audit_key, audit]}``: the files in force and the audit MAC key (KMS ciphertext; a new one
    comes back on first run); with ``resume``, ``audit`` holds the record sealed to say which
    records the log lost, for the host to append before anything else. A bad file is an
    error frame and the configuration in force stays. ``audit_tail`` (log lines, oldest
    first, at most 4096) rebuilds the spend windows: on the first call it ends with
    ``audit_head``; while ``windows_ready`` is false, each later call carries the next older
    chunk. A tail that does not verify is an error frame."""
    AUDIT_VERIFY = 10
    """``{records: [log line], state, final[, audit_key]}`` → ``{state, checked, head: {seq,
    hash}, policies, against_chain_head[, problem: {position, seq, kind, detail}]}``: the
    audit log checked in the enclave, one chunk at a time (``state`` carries the chain between
    chunks). ``audit_key`` is the MAC key's KMS ciphertext, unwrapped for verification only
    (absent: the key of the gate in force); nothing the gate enforces changes.
    ``against_chain_head``: the key is the one the gate seals with, so ``final`` reports a
    log that ends before the enclave's chain head (``truncated``). ``audit_key`` and
    ``against_chain_head`` came without a version bump: an enclave that ignored
    ``audit_key`` answers without ``against_chain_head``, and the host refuses that answer."""
    ERROR = 127
    """A response only: ``{code, message[, field]}``; a refused GATE_CONFIGURE's also
    ``files``, the files refused (:class:`~signd.errors.ConfigurationRefused`)."""


class Flag(IntFlag):
    NONE = 0
    RESPONSE = 0x0001


_KNOWN_FLAGS: Final = int(Flag.RESPONSE)
_RESPONSE_BIT: Final = int(Flag.RESPONSE)
"""``Flag.RESPONSE`` as a plain int: tested on every frame, where a flag operation costs
more than the rest of the test."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One complete, well-formed frame."""

    message_type: MessageType
    request_id: int
    body: dict[str, Any]
    flags: Flag = Flag.NONE
    version: int = PROTOCOL_VERSION

    @property
    def is_response(self) -> bool:
        return int(self.flags) & _RESPONSE_BIT != 0


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """A frame or stream the decoder refused; answer it with :func:`encode_error`."""

    request_id: int
    error: SigndError
    fatal: bool
    """The stream is out of step: answer, then close the connection."""


Event = Frame | ProtocolViolation


@dataclass(frozen=True, slots=True)
class Reply:
    """What an event a client received means: the request ``request_id`` it answers, with
    its ``body`` or ``error``; or, with ``broken`` set, that the connection must close (and
    every waiting request fail with that reason)."""

    request_id: int
    body: dict[str, Any] | None = None
    error: SigndError | None = None
    broken: str | None = None


def reply_to(event: Event, expected: MessageType | None) -> Reply:
    """Read an event on the client's side of a connection; ``expected`` is the type of the
    request waiting under the event's request id (``None`` if none waits)."""
    if isinstance(event, ProtocolViolation):
        if event.fatal:
            return Reply(event.request_id, broken="the enclave sent a garbled stream")
        return Reply(event.request_id, error=event.error)
    if event.message_type is MessageType.ERROR:
        return Reply(event.request_id, error=error_from_body(event.body))
    if not event.is_response or event.message_type is not expected:
        return Reply(event.request_id, broken="the enclave answered out of protocol")
    return Reply(event.request_id, body=event.body)


def next_request_id(ids: Iterator[int], in_use: Container[int]) -> int:
    """The next id from ``ids`` that no waiting request holds."""
    request_id = next(ids)
    while request_id in in_use:
        request_id = next(ids)
    return request_id


def answer_frame_size(max_frame_size: int) -> int:
    """The limit on answer frames of a connection whose requests are limited to
    ``max_frame_size``: :data:`MAX_ANSWER_FRAME_SIZE`, or that if larger."""
    return max(max_frame_size, MAX_ANSWER_FRAME_SIZE)


def _check_max_frame_size(max_frame_size: int) -> int:
    if not MIN_FRAME_SIZE <= max_frame_size <= U32_MAX:
        raise InvalidField(
            f"max frame size must be between {MIN_FRAME_SIZE} and {U32_MAX} bytes",
            field="max_frame_size",
        )
    return max_frame_size


def encode_frame(
    message_type: MessageType,
    request_id: int,
    body: Mapping[str, Any],
    *,
    flags: Flag = Flag.NONE,
    version: int = PROTOCOL_VERSION,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
) -> bytes:
    """Serialise one frame; a frame over ``max_frame_size`` raises InvalidRequest."""
    if not 0 <= request_id <= U32_MAX:
        raise InvalidField("request id must be a u32", field="request_id")
    payload = cbor2.dumps(dict(body))
    size = HEADER_SIZE + len(payload)
    if size > max_frame_size:
        raise InvalidRequest(f"a {size}-byte frame exceeds the {max_frame_size}-byte limit")
    return HEADER.pack(MAGIC, version, message_type, flags, request_id, len(payload)) + payload


def encode_error(request_id: int, error: SigndError, *, version: int = PROTOCOL_VERSION) -> bytes:
    """An ERROR response frame carrying ``error`` as ``{code, message[, field]}``."""
    return encode_frame(
        MessageType.ERROR, request_id, error.to_dict(), flags=Flag.RESPONSE, version=version
    )


def _error_classes() -> dict[str, type[SigndError]]:
    table: dict[str, type[SigndError]] = {}
    pending: list[type[SigndError]] = [SigndError]
    while pending:
        cls = pending.pop()
        if cls.__module__ == errors.__name__:
            table.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return table


def error_from_body(body: Mapping[str, Any]) -> SigndError:
    """Rebuild the error an ERROR frame carries, as the same :mod:`signd.errors` class."""
    code, message, field = body.get("code"), body.get("message"), body.get("field")
    if not isinstance(message, str):
        message = "the enclave reported an error without a message"
    cls = _error_classes().get(code, SigndError) if isinstance(code, str) else SigndError
    field = field if isinstance(field, str) else None
    if cls is errors.ConfigurationRefused:
        files = body.get("files")
        named = files if isinstance(files, list) else []
        return errors.ConfigurationRefused(
            message, files=[name for name in named if isinstance(name, str)], field=field
        )
    return cls(message, field=field)


def negotiate_version(offered: Iterable[int]) -> int:
    """The highest version both sides speak; none in common raises UnsupportedOperation."""
    common = SUPPORTED_VERSIONS.intersection(offered)
    if not common:
        raise UnsupportedOperation(
            f"no common protocol version (this side speaks {sorted(SUPPORTED_VERSIONS)})"
        )
    return max(common)


def _decode_payload(payload: bytes) -> dict[str, Any]:
    """One CBOR map with text keys and no trailing bytes, or InvalidRequest."""
    stream = io.BytesIO(payload)
    try:
        body = cbor2.CBORDecoder(
            stream, max_depth=MAX_PAYLOAD_DEPTH, allow_duplicate_keys=False
        ).decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, LookupError):
        raise InvalidRequest("payload is not valid CBOR") from None
    if stream.tell() != len(payload):
        raise InvalidRequest("payload has trailing bytes after its CBOR map")
    if not isinstance(body, dict) or not all(isinstance(key, str) for key in body):
        raise InvalidRequest("payload must be a CBOR map with text keys")
    return body


class FrameDecoder:
    """Turns a byte stream into :class:`Frame` and :class:`ProtocolViolation` events.

    Feed it whatever the socket returned, in any chunking; it buffers at most one frame. After a
    fatal violation it is closed and ignores further input.
    """

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = _check_max_frame_size(max_frame_size)
        self._buffer = bytearray()
        self.closed = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Event]:
        """Add received bytes; return the events they complete."""
        if self.closed:
            return []
        self._buffer += data
        events: list[Event] = []
        offset = 0
        while not self.closed:
            event, consumed = self._next_event(offset)
            if event is None:
                break
            events.append(event)
            offset += consumed
        if self.closed:
            self._buffer.clear()
        else:
            del self._buffer[:offset]
        return events

    def _fatal(self, request_id: int, error: SigndError) -> tuple[ProtocolViolation, int]:
        self.closed = True
        return ProtocolViolation(request_id, error, fatal=True), 0

    def _next_event(self, offset: int) -> tuple[Event | None, int]:
        available = len(self._buffer) - offset
        prefix = bytes(self._buffer[offset : offset + min(available, len(MAGIC))])
        if not MAGIC.startswith(prefix):
            return self._fatal(NO_REQUEST_ID, InvalidRequest("stream is out of step (bad magic)"))
        if available < HEADER_SIZE:
            return None, 0
        _, version, type_code, flags, request_id, length = HEADER.unpack_from(self._buffer, offset)
        if HEADER_SIZE + length > self.max_frame_size:
            error = InvalidRequest(
                f"a {HEADER_SIZE + length}-byte frame exceeds the {self.max_frame_size}-byte limit"
            )
            return self._fatal(request_id, error)
        if available < HEADER_SIZE + length:
            return None, 0
        start = offset + HEADER_SIZE
        payload = bytes(self._buffer[start : start + length])
        consumed = HEADER_SIZE + length
        try:
            frame = self._frame(version, type_code, flags, request_id, payload)
        except SigndError as error:
            return ProtocolViolation(request_id, error, fatal=False), consumed
        return frame, consumed

    @staticmethod
    def _frame(version: int, type_code: int, flags: int, request_id: int, payload: bytes) -> Frame:
        if version not in SUPPORTED_VERSIONS:
            raise UnsupportedOperation(
                f"protocol version {version} is not supported "
                f"(this side speaks {sorted(SUPPORTED_VERSIONS)})"
            )
        try:
            message_type = MessageType(type_code)
        except ValueError:
            raise UnsupportedOperation(f"unknown message type {type_code}") from None
        if flags & ~_KNOWN_FLAGS:
            raise InvalidRequest(f"reserved flag bits set: {flags:#06x}")
        return Frame(message_type, request_id, _decode_payload(payload), Flag(flags), version)


def require_str(body: Mapping[str, Any], name: str, *, max_length: int = 256) -> str:
    """A non-empty text field of at most ``max_length`` characters."""
    value = body.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= max_length:
        raise InvalidField(f"{name} must be text of 1-{max_length} characters", field=name)
    return value


def require_bytes(body: Mapping[str, Any], name: str, *, size: int | None = None) -> bytes:
    """A byte-string field, of exactly ``size`` bytes when given."""
    value = body.get(name)
    if not isinstance(value, bytes) or (size is not None and len(value) != size):
        expected = f"{size} bytes" if size is not None else "bytes"
        raise InvalidField(f"{name} must be {expected}", field=name)
    return value


def require_int(body: Mapping[str, Any], name: str, *, minimum: int, maximum: int) -> int:
    """An integer field within ``[minimum, maximum]``."""
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise InvalidField(f"{name} must be an integer in {minimum}..{maximum}", field=name)
    return value


def require_list(body: Mapping[str, Any], name: str, *, max_length: int) -> list[Any]:
    """A list field of at most ``max_length`` items."""
    value = body.get(name)
    if not isinstance(value, list) or len(value) > max_length:
        raise InvalidField(f"{name} must be a list of at most {max_length} items", field=name)
    return value


MAX_BATCH: Final = 1000
"""The most keys one CREATE_KEYS makes and the most items one SIGN_DIGESTS carries."""
MAX_ATTESTATION_NONCE: Final = 64
"""The longest nonce an ATTESTATION request may carry, in bytes."""


def check_attestation_nonce(nonce: object) -> bytes:
    """An ATTESTATION nonce: 1 to :data:`MAX_ATTESTATION_NONCE` bytes."""
    if not isinstance(nonce, bytes) or not 0 < len(nonce) <= MAX_ATTESTATION_NONCE:
        raise InvalidField(f"nonce must be 1-{MAX_ATTESTATION_NONCE} bytes", field="nonce")
    return nonce


MAX_NAME_LENGTH: Final = 256


def canonical_labels(labels: Sequence[str]) -> tuple[str, ...]:
    """Key labels in the one form a sealed blob binds: each checked as the custody layer checks
    labels (else InvalidField), then de-duplicated and sorted."""
    return tuple(sorted(check_labels(labels)))


def request_labels(body: Mapping[str, Any]) -> tuple[str, ...]:
    """The optional ``labels`` field of a request, canonical (absent: no labels)."""
    if "labels" not in body:
        return ()
    labels = body["labels"]
    if not isinstance(labels, list):
        raise InvalidField("labels must be a list of strings", field="labels")
    return canonical_labels(labels)


@dataclass(frozen=True, slots=True, eq=False)
class KeyReference:
    """Everything the enclave needs to find and check one sealed key (all of it public).

    ``labels`` are the labels claimed for the key, kept canonical (:func:`canonical_labels`);
    the sealed blob binds the true ones, so a wrong claim fails to unseal.

    Two references are equal when all their fields are. The fields are compared and hashed
    as one tuple, made once: the unsealed-key cache looks a reference up for every
    signature.
    """

    key_id: str
    chain: str
    address: str
    blob: str
    labels: tuple[str, ...] = ()
    _identity: tuple[str, str, str, str, tuple[str, ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.labels != ():
            object.__setattr__(self, "labels", canonical_labels(self.labels))
        identity = (self.key_id, self.chain, self.address, self.blob, self.labels)
        object.__setattr__(self, "_identity", identity)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KeyReference):
            return NotImplemented
        return self._identity == other._identity

    def __hash__(self) -> int:
        return hash(self._identity)

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "key_id": self.key_id,
            "chain": self.chain,
            "address": self.address,
            "blob": self.blob,
        }
        if self.labels:
            body["labels"] = list(self.labels)
        return body

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> KeyReference:
        return cls(
            require_str(body, "key_id", max_length=MAX_NAME_LENGTH),
            require_str(body, "chain", max_length=MAX_NAME_LENGTH),
            require_str(body, "address", max_length=MAX_NAME_LENGTH),
            require_str(body, "blob", max_length=MAX_NAME_LENGTH),
            request_labels(body),
        )


@dataclass(frozen=True, slots=True)
class CreatedKey:
    """A key the enclave created and sealed: its public facts and where its blob is."""

    key_id: str
    chain: str
    address: str
    public_key: bytes
    blob: str
    labels: tuple[str, ...] = ()
    """The labels its blob binds (canonical)."""

    @property
    def reference(self) -> KeyReference:
        return KeyReference(self.key_id, self.chain, self.address, self.blob, self.labels)

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "key_id": self.key_id,
            "chain": self.chain,
            "address": self.address,
            "blob": self.blob,
            "public_key": self.public_key,
        }
        if self.labels:
            body["labels"] = list(self.labels)
        return body

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> CreatedKey:
        ref = KeyReference.from_body(body)
        public_key = require_bytes(body, "public_key", size=33)
        return cls(ref.key_id, ref.chain, ref.address, public_key, ref.blob, ref.labels)


MAX_CKA_ID_SIZE: Final = 64


def request_custody(body: Mapping[str, Any]) -> str:
    """The custody a request names (``"enclave"`` when it names none)."""
    custody = body.get("custody", CUSTODY_ENCLAVE)
    if custody not in CUSTODIES:
        raise InvalidField(f"custody must be one of {list(CUSTODIES)}", field="custody")
    return str(custody)


def _require_cka_id(body: Mapping[str, Any]) -> bytes:
    value = require_bytes(body, "cka_id")
    if not 0 < len(value) <= MAX_CKA_ID_SIZE:
        raise InvalidField(f"cka_id must be 1-{MAX_CKA_ID_SIZE} bytes", field="cka_id")
    return value


@dataclass(frozen=True, slots=True)
class HsmKeyReference:
    """Everything the enclave needs to sign with one HSM key: the token object's CKA_ID."""

    key_id: str
    cka_id: bytes

    def to_body(self) -> dict[str, Any]:
        return {"custody": CUSTODY_HSM, "key_id": self.key_id, "cka_id": self.cka_id}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> HsmKeyReference:
        return cls(require_str(body, "key_id", max_length=MAX_NAME_LENGTH), _require_cka_id(body))


@dataclass(frozen=True, slots=True)
class CreatedHsmKey:
    """A key the enclave generated on the HSM token: its public facts and token object names."""

    key_id: str
    chain: str
    address: str
    public_key: bytes
    cka_id: bytes
    label: str

    @property
    def reference(self) -> HsmKeyReference:
        return HsmKeyReference(self.key_id, self.cka_id)

    def to_body(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "chain": self.chain,
            "address": self.address,
            "public_key": self.public_key,
            "cka_id": self.cka_id,
            "label": self.label,
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> CreatedHsmKey:
        return cls(
            require_str(body, "key_id", max_length=MAX_NAME_LENGTH),
            require_str(body, "chain", max_length=MAX_NAME_LENGTH),
            require_str(body, "address", max_length=MAX_NAME_LENGTH),
            require_bytes(body, "public_key", size=33),
            _require_cka_id(body),
            require_str(body, "label", max_length=MAX_NAME_LENGTH),
        )
