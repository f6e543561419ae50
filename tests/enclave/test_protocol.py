"""The sans-I/O frame codec: round trips, chunking, limits and every way a frame can be bad."""

from __future__ import annotations

import struct

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signd import errors
from signd.enclave.protocol import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MIN_FRAME_SIZE,
    PROTOCOL_VERSION,
    CreatedKey,
    Flag,
    Frame,
    FrameDecoder,
    KeyReference,
    MessageType,
    ProtocolViolation,
    encode_error,
    encode_frame,
    error_from_body,
    negotiate_version,
)
from signd.errors import (
    ConfigurationRefused,
    InvalidField,
    InvalidRequest,
    KeyNotFound,
    SigndError,
    UnsupportedOperation,
)


def raw_frame(
    payload: bytes,
    *,
    version: int = PROTOCOL_VERSION,
    message_type: int = MessageType.HEALTH,
    flags: int = 0,
    request_id: int = 7,
    length: int | None = None,
) -> bytes:
    size = len(payload) if length is None else length
    return HEADER.pack(MAGIC, version, message_type, flags, request_id, size) + payload


def feed_in_chunks(decoder: FrameDecoder, data: bytes, sizes: list[int]) -> list[object]:
    events: list[object] = []
    offset = 0
    for size in sizes:
        events += decoder.feed(data[offset : offset + size])
        offset += size
    events += decoder.feed(data[offset:])
    return events


bodies = st.dictionaries(
    st.text(max_size=8),
    st.one_of(
        st.binary(max_size=64),
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.text(max_size=32),
        st.lists(st.binary(max_size=8), max_size=4),
        st.booleans(),
        st.none(),
    ),
    max_size=6,
)


def test_header_is_sixteen_bytes_big_endian() -> None:
    data = encode_frame(MessageType.SIGN_DIGEST, 0x01020304, {}, flags=Flag.RESPONSE)
    assert HEADER_SIZE == 16
    assert data[:4] == b"SGND"
    assert data[4] == PROTOCOL_VERSION
    assert data[5] == MessageType.SIGN_DIGEST
    assert data[6:8] == b"\x00\x01"
    assert data[8:12] == b"\x01\x02\x03\x04"
    assert struct.unpack(">I", data[12:16])[0] == len(data) - 16 == len(cbor2.dumps({}))


@pytest.mark.parametrize("message_type", list(MessageType))
def test_every_message_type_round_trips(message_type: MessageType) -> None:
    body = {"chain": "ethereum", "digest": b"\x01" * 32, "count": 3, "items": [{"a": 1}]}
    data = encode_frame(message_type, 99, body, flags=Flag.RESPONSE)
    [frame] = FrameDecoder().feed(data)
    assert frame == Frame(message_type, 99, body, Flag.RESPONSE, PROTOCOL_VERSION)
    assert frame.is_response


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.sampled_from(list(MessageType)), st.integers(0, 2**32 - 1), bodies),
        min_size=1,
        max_size=5,
    ),
    st.lists(st.integers(1, 40), max_size=30),
)
def test_pipelined_frames_survive_any_chunking(
    frames: list[tuple[MessageType, int, dict[str, object]]], sizes: list[int]
) -> None:
    data = b"".join(encode_frame(t, rid, body) for t, rid, body in frames)
    events = feed_in_chunks(FrameDecoder(), data, sizes)
    assert events == [Frame(t, rid, body) for t, rid, body in frames]


@settings(max_examples=300)
@given(st.binary(max_size=2048), st.lists(st.integers(1, 64), max_size=40))
def test_random_bytes_never_crash_the_decoder(data: bytes, sizes: list[int]) -> None:
    decoder = FrameDecoder(max_frame_size=MIN_FRAME_SIZE)
    events = feed_in_chunks(decoder, data, sizes)
    assert all(isinstance(e, Frame | ProtocolViolation) for e in events)
    fatal = [i for i, e in enumerate(events) if isinstance(e, ProtocolViolation) and e.fatal]
    assert fatal in ([], [len(events) - 1])
    for event in events:
        if isinstance(event, ProtocolViolation):
            assert isinstance(event.error, SigndError)
    assert decoder.buffered < MIN_FRAME_SIZE


@settings(max_examples=300)
@given(
    st.binary(max_size=512),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
)
def test_a_random_payload_never_desynchronises_the_stream(
    payload: bytes, version: int, message_type: int, flags: int
) -> None:
    bad = raw_frame(payload, version=version, message_type=message_type, flags=flags)
    good = encode_frame(MessageType.HEALTH, 2, {"ok": True})
    events = FrameDecoder().feed(bad + good)
    assert len(events) == 2
    first = events[0]
    assert isinstance(first, Frame) or (
        isinstance(first, ProtocolViolation) and not first.fatal and first.request_id == 7
    )
    assert events[1] == Frame(MessageType.HEALTH, 2, {"ok": True})


def test_truncated_frame_waits_for_the_rest() -> None:
    data = encode_frame(MessageType.SIGN_DIGEST, 5, {"digest": b"\x00" * 32})
    decoder = FrameDecoder()
    assert decoder.feed(data[:-1]) == []
    assert decoder.buffered == len(data) - 1
    [frame] = decoder.feed(data[-1:])
    assert isinstance(frame, Frame)
    assert frame.request_id == 5
    assert decoder.buffered == 0


def test_half_a_header_waits() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(MAGIC[:2]) == []
    assert decoder.feed(encode_frame(MessageType.HEALTH, 1, {})[2:10]) == []
    assert not decoder.closed


def test_oversized_length_is_fatal_before_the_payload_arrives() -> None:
    decoder = FrameDecoder(max_frame_size=MIN_FRAME_SIZE)
    header_only = raw_frame(b"", request_id=11, length=0xFFFF_FFFF)
    [event] = decoder.feed(header_only)
    assert isinstance(event, ProtocolViolation)
    assert event.fatal
    assert event.request_id == 11
    assert isinstance(event.error, InvalidRequest)
    assert "limit" in event.error.message
    assert decoder.closed
    assert decoder.buffered == 0
    assert decoder.feed(encode_frame(MessageType.HEALTH, 1, {})) == []


def test_frame_exactly_at_the_limit_is_accepted_and_one_byte_more_is_not() -> None:
    limit = MIN_FRAME_SIZE
    sizes = (encode_frame(MessageType.HEALTH, 1, {"p": b"x" * n}) for n in range(limit - 16, 0, -1))
    fits = next(data for data in sizes if len(data) == limit)
    assert isinstance(FrameDecoder(max_frame_size=limit).feed(fits)[0], Frame)
    too_big = raw_frame(b"", length=limit - HEADER_SIZE + 1)
    [event] = FrameDecoder(max_frame_size=limit).feed(too_big)
    assert isinstance(event, ProtocolViolation)
    assert event.fatal
    with pytest.raises(InvalidRequest):
        encode_frame(MessageType.HEALTH, 1, {"p": b"x" * limit}, max_frame_size=limit)


def test_max_frame_size_is_validated() -> None:
    with pytest.raises(InvalidField):
        FrameDecoder(max_frame_size=10)


def test_bad_magic_is_fatal_at_the_first_wrong_byte() -> None:
    decoder = FrameDecoder()
    [event] = decoder.feed(b"GET / HTTP/1.1\r\n")
    assert isinstance(event, ProtocolViolation)
    assert event.fatal
    assert event.request_id == 0
    assert decoder.closed
    partial = FrameDecoder()
    assert partial.feed(b"SG") == []
    [event] = partial.feed(b"X")
    assert isinstance(event, ProtocolViolation)
    assert event.fatal


def test_garbage_after_good_frames_yields_the_frames_then_a_fatal_error() -> None:
    good = encode_frame(MessageType.HEALTH, 1, {})
    events = FrameDecoder().feed(good + good + b"\x00garbage")
    assert [type(e) for e in events] == [Frame, Frame, ProtocolViolation]
    assert isinstance(events[2], ProtocolViolation)
    assert events[2].fatal


@pytest.mark.parametrize(
    ("frame", "error", "text"),
    [
        (raw_frame(cbor2.dumps({}), message_type=200), UnsupportedOperation, "message type"),
        (raw_frame(cbor2.dumps({}), version=9), UnsupportedOperation, "version 9"),
        (raw_frame(cbor2.dumps({}), version=0), UnsupportedOperation, "version 0"),
        (raw_frame(cbor2.dumps({}), flags=0x8000), InvalidRequest, "reserved flag"),
        (raw_frame(b"\xff\xff"), InvalidRequest, "CBOR"),
        (raw_frame(b""), InvalidRequest, "CBOR"),
        (raw_frame(cbor2.dumps([1, 2])), InvalidRequest, "map"),
        (raw_frame(cbor2.dumps({1: 2})), InvalidRequest, "text keys"),
        (raw_frame(cbor2.dumps({}) + b"\x00"), InvalidRequest, "trailing"),
        (raw_frame(b"\xa2\x61a\x00\x61a\x01"), InvalidRequest, "CBOR"),
        (raw_frame(b"\xa1\x61a" + b"\x81" * 100 + b"\x00"), InvalidRequest, "CBOR"),
    ],
)
def test_bad_frames_are_refused_for_their_request_and_the_stream_goes_on(
    frame: bytes, error: type[SigndError], text: str
) -> None:
    decoder = FrameDecoder()
    events = decoder.feed(frame + encode_frame(MessageType.HEALTH, 8, {}))
    violation, follower = events
    assert isinstance(violation, ProtocolViolation)
    assert not violation.fatal
    assert violation.request_id == 7
    assert type(violation.error) is error
    assert text in violation.error.message
    assert follower == Frame(MessageType.HEALTH, 8, {})


def test_encode_refuses_a_request_id_outside_u32() -> None:
    with pytest.raises(InvalidField):
        encode_frame(MessageType.HEALTH, 2**32, {})
    with pytest.raises(InvalidField):
        encode_frame(MessageType.HEALTH, -1, {})


def _error_classes() -> list[type[SigndError]]:
    return [
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, SigndError)
    ]


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda cls: cls.__name__)
def test_every_error_class_crosses_the_boundary_as_itself(cls: type[SigndError]) -> None:
    data = encode_error(3, cls("something went wrong", field="digest"))
    [frame] = FrameDecoder().feed(data)
    assert isinstance(frame, Frame)
    assert frame.message_type is MessageType.ERROR
    assert frame.is_response
    assert frame.request_id == 3
    rebuilt = error_from_body(frame.body)
    assert type(rebuilt) is cls
    assert rebuilt.message == "something went wrong"
    assert rebuilt.field == "digest"


def test_a_configuration_refusal_crosses_the_boundary_with_its_files() -> None:
    sent = ConfigurationRefused("clients: bad; policy: bad", files=["clients", "policy"])
    [frame] = FrameDecoder().feed(encode_error(4, sent))
    assert isinstance(frame, Frame)
    rebuilt = error_from_body(frame.body)
    assert isinstance(rebuilt, ConfigurationRefused)
    assert (rebuilt.files, rebuilt.message) == (("clients", "policy"), sent.message)
    for files, kept in (([1, "policy"], ("policy",)), ("clients", ())):
        malformed = error_from_body(
            {"code": "configuration_refused", "message": "m", "files": files}
        )
        assert isinstance(malformed, ConfigurationRefused) and malformed.files == kept


def test_unknown_or_malformed_error_bodies_become_the_root_error() -> None:
    unknown = error_from_body({"code": "martian", "message": "?"})
    assert type(unknown) is SigndError
    assert unknown.message == "?"
    assert type(error_from_body({"code": 5})) is SigndError
    assert type(error_from_body({"code": "key_not_found", "message": "gone"})) is KeyNotFound


def test_version_negotiation_picks_the_common_version() -> None:
    assert negotiate_version([1, 2, 3]) == 2
    assert negotiate_version([1]) == 1
    assert negotiate_version([0, 2, 7]) == 2
    with pytest.raises(UnsupportedOperation):
        negotiate_version([3, 4])
    with pytest.raises(UnsupportedOperation):
        negotiate_version([])


def test_message_schemas_round_trip_and_validate() -> None:
    created = CreatedKey("k1", "ethereum", "0xabc", b"\x02" * 33, "enclave-k1")
    assert CreatedKey.from_body(created.to_body()) == created
    assert KeyReference.from_body(created.reference.to_body()) == created.reference
    with pytest.raises(InvalidField) as info:
        CreatedKey.from_body({**created.to_body(), "public_key": b"\x02" * 32})
    assert info.value.field == "public_key"
    with pytest.raises(InvalidField):
        KeyReference.from_body({**created.reference.to_body(), "blob": ""})
    with pytest.raises(InvalidField):
        KeyReference.from_body({**created.reference.to_body(), "key_id": 5})


def test_key_references_are_equal_exactly_when_every_field_is() -> None:
    reference = KeyReference("k1", "ethereum", "0xabc", "enclave-k1", ("hot", "eu"))
    same = KeyReference("k1", "ethereum", "0xabc", "enclave-k1", ("eu", "hot"))
    assert same == reference and hash(same) == hash(reference)
    assert {reference: "unsealed"}[same] == "unsealed"
    for other in (
        KeyReference("k2", "ethereum", "0xabc", "enclave-k1", ("hot", "eu")),
        KeyReference("k1", "bitcoin", "0xabc", "enclave-k1", ("hot", "eu")),
        KeyReference("k1", "ethereum", "0xabd", "enclave-k1", ("hot", "eu")),
        KeyReference("k1", "ethereum", "0xabc", "enclave-k2", ("hot", "eu")),
        KeyReference("k1", "ethereum", "0xabc", "enclave-k1", ("hot",)),
        KeyReference("k1", "ethereum", "0xabc", "enclave-k1"),
    ):
        assert other != reference and reference != other
        assert other not in {reference}
    assert reference != ("k1", "ethereum", "0xabc", "enclave-k1", ("eu", "hot"))
    assert "_identity" not in repr(reference)
