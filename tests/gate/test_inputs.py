"""Batch items: the one-pass reading of a plain hash item agrees with the general reader."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from signd.errors import InvalidField, InvalidRequest, SigndError
from signd.gate import SigningCall, SigningKind
from signd.gate.inputs import (
    _plain_hash_item,
    parse_batch_item,
    parse_json,
    parse_typed_request,
    rpc_address,
)

HEX = "0123456789abcdefABCDEF"
ODD_CHARACTERS = " \t\n\u0660\u00e9gx+-_"
"""Whitespace (which ``bytes.fromhex`` skips), Unicode digits and letters, signs."""


def _general(index: int, item: object) -> SigningCall | tuple[str, str | None]:
    """What reading the item without the one-pass path gives: the call or the error."""
    try:
        if not isinstance(item, dict):
            return parse_batch_item(index, item)
        return parse_typed_request(item, f"requests[{index}]")
    except SigndError as exc:
        return (exc.message, exc.field)


def _outcome(index: int, item: object) -> SigningCall | tuple[str, str | None]:
    try:
        return parse_batch_item(index, item)
    except SigndError as exc:
        return (exc.message, exc.field)


digest_text = st.one_of(
    st.text(alphabet=HEX, min_size=64, max_size=64).map(lambda digits: "0x" + digits),
    st.text(alphabet=HEX + ODD_CHARACTERS, min_size=60, max_size=68).map(lambda s: "0x" + s),
    st.text(alphabet=HEX, min_size=66, max_size=66),
    st.sampled_from(
        [
            "0X" + "ab" * 32,
            "0x",
            "",
            "0x" + "ab" * 31 + " a",
            "0x" + "ab" * 31 + "  ",
            "0x" + "a b" * 21 + "c",
        ]
    ),
    st.integers(),
    st.none(),
)
hash_item = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["hash", "hash ", "ethereum/message", 1]),
        "key": st.one_of(st.text(max_size=8), st.integers(), st.none()),
        "hash": digest_text,
    },
    optional={"extra": st.integers()},
)


@given(item=hash_item, index=st.integers(min_value=0, max_value=999))
def test_a_plain_hash_item_reads_as_the_general_reader_reads_it(
    item: dict[str, Any], index: int
) -> None:
    plain = _plain_hash_item(item)
    if plain is not None:
        assert plain == parse_typed_request(item)
        assert plain.kind is SigningKind.HASH and len(plain.payload) == 32
    assert _outcome(index, item) == _general(index, item)


@pytest.mark.parametrize(
    "digest",
    [
        "0x" + "ab" * 31 + "  ",  # fromhex skips the spaces: 31 bytes
        "0x" + "ab" * 31 + "\tc",
        "0x" + " ab" * 21 + "a",
        "0x" + "ab" * 31 + "\u0660\u0661",  # Arabic-Indic digits
        "0x" + "ab" * 31 + "gg",
        "0x" + "ab" * 32 + "ab",
        "ab" * 33,
    ],
)
def test_a_hash_item_the_one_pass_path_may_not_take(digest: str) -> None:
    item = {"type": "hash", "key": "k", "hash": digest}
    assert _plain_hash_item(item) is None
    refusal = _general(3, item)
    assert _outcome(3, item) == refusal
    assert isinstance(refusal, tuple) and refusal[1] == "requests[3].hash"


def test_every_well_formed_hash_item_takes_the_one_pass_path() -> None:
    for digest in ("0x" + "ab" * 32, "0X" + "CD" * 32, "0x" + "0" * 64):
        item = {"type": "hash", "key": "k", "hash": digest}
        assert _plain_hash_item(item) == SigningCall(
            SigningKind.HASH, "k", bytes.fromhex(digest[2:])
        )


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (rb'{"a": "\ud800"}', "a"),
        (rb'{"a": [1, {"b": "x\udc00y"}]}', "a[1].b"),
        (rb'{"a": {"\uDBFF": 1}}', "a"),
        (rb'{"\ud800": 1}', None),
        (rb'["\udfff\ud800"]', "[0]"),
    ],
)
def test_json_with_a_lone_surrogate_is_refused_naming_where(text: bytes, field: str | None) -> None:
    """JSON escapes any UTF-16 unit; one without its pair has no UTF-8 form, so nothing could
    quote it back (an answer, a log line, the enclave's frame)."""
    with pytest.raises(InvalidField) as caught:
        parse_json(text)
    assert "lone UTF-16 surrogate" in caught.value.message
    assert caught.value.field == field
    caught.value.to_dict()["message"].encode()  # the refusal itself is UTF-8


def test_json_with_surrogates_that_pair_or_are_only_written_out_is_read() -> None:
    assert parse_json(rb'{"a": "\ud83d\ude00"}') == {"a": "\U0001f600"}
    assert parse_json(rb'{"a": "\\ud800"}') == {"a": "\\ud800"}  # a backslash, then text
    assert parse_json('{"a": "\U0001f600"}'.encode()) == {"a": "\U0001f600"}


def test_utf8_bytes_of_a_surrogate_are_not_json() -> None:
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        parse_json(b'{"a": "\xed\xa0\x80"}')


def test_an_error_quoting_a_lone_surrogate_is_still_utf8() -> None:
    """Whatever a message quotes, the error's body can be written as UTF-8 (as its escape)."""
    body = InvalidField("unknown field \ud800", field="\ud800x").to_dict()
    assert body == {
        "code": "invalid_field",
        "message": "unknown field \\ud800",
        "field": "\\ud800x",
    }


def test_an_address_with_a_line_break_after_it_is_not_an_address() -> None:
    address = "0x" + "11" * 20
    assert rpc_address(address) == address
    for unfit in (address + "\n", "\n" + address, address + " "):
        with pytest.raises(InvalidField):
            rpc_address(unfit)
