"""Strict parsing of wallet JSON and strict decoding of raw transactions."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import rlp

from signd.chains.ethereum.encoding import int_to_bytes
from signd.chains.ethereum.transactions import (
    MAX_CHAIN_ID,
    AccessListTransaction,
    DynamicFeeTransaction,
    LegacyTransaction,
    decode_transaction,
    parse_transaction,
)
from signd.crypto.secp256k1 import CURVE_ORDER, RecoverableSignature, sign_digest_with
from signd.errors import InvalidField, InvalidSignature, InvalidTransaction
from tests.chains.ethereum.support import address_of, private_key, sign

KEY = private_key("0x" + "42" * 32)
TO = "0xF0109fC8DF283027b6285cc889F5aA624EaC1F55"

LEGACY = {"nonce": "0x1", "gasPrice": "0x3b9aca00", "gas": "0x5208", "to": TO, "value": "0x1"}
EIP155 = {**LEGACY, "chainId": "0x1"}
EIP2930 = {**EIP155, "type": "0x1", "accessList": []}
EIP1559 = {
    "type": "0x2",
    "chainId": 1,
    "nonce": 1,
    "maxPriorityFeePerGas": "0x1",
    "maxFeePerGas": "0x2",
    "gas": 21000,
    "to": TO,
    "value": "1000",
    "data": "0x",
    "accessList": [],
}
ACCESS_ENTRY = {"address": TO, "storageKeys": ["0x" + "00" * 31 + "01"]}
DELETE = object()


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    result = {**base, **changes}
    return {key: value for key, value in result.items() if value is not DELETE}


BAD_INPUTS = [
    # missing required fields
    ("missing-nonce", _with(EIP1559, nonce=DELETE), "nonce"),
    ("missing-gas", _with(LEGACY, gas=DELETE), "gas"),
    ("missing-gasPrice", _with(LEGACY, gasPrice=DELETE), "gasPrice"),
    ("missing-maxFeePerGas", _with(EIP1559, maxFeePerGas=DELETE), "maxFeePerGas"),
    ("missing-priority-fee", _with(EIP1559, maxPriorityFeePerGas=DELETE), "maxPriorityFeePerGas"),
    ("null-nonce", _with(EIP1559, nonce=None), "nonce"),
    ("missing-chainId-typed", _with(EIP1559, chainId=DELETE), "chainId"),
    ("null-chainId-typed", _with(EIP2930, chainId=None), "chainId"),
    # unknown, extra and wrong-type fields
    ("unknown-field", _with(EIP1559, gasLimitt="0x1"), "gasLimitt"),
    ("blob-field", _with(EIP1559, maxFeePerBlobGas="0x1"), "maxFeePerBlobGas"),
    ("gasPrice-in-1559", _with(EIP1559, gasPrice="0x1"), "gasPrice"),
    ("maxFee-in-2930", _with(EIP2930, maxFeePerGas="0x1"), "maxFeePerGas"),
    ("accessList-in-legacy", _with(LEGACY, type="0x0", accessList=[]), "accessList"),
    ("gasPrice-and-maxFee-untyped", _with(EIP1559, type=DELETE, gasPrice="0x1"), "gasPrice"),
    ("gas-and-gasLimit", _with(LEGACY, gasLimit="0x5208"), "gasLimit"),
    ("data-and-input", _with(LEGACY, data="0x01", input="0x02"), "input"),
    ("data-and-input-not-hex", _with(LEGACY, data="0xzz", input="0xZZ"), "data"),
    # types
    ("type-3", _with(EIP1559, type="0x3"), "type"),
    ("type-4", _with(EIP1559, type=4), "type"),
    ("type-bool", _with(EIP1559, type=True), "type"),
    ("type-garbage", _with(EIP1559, type="two"), "type"),
    # negative, overflow
    ("negative-nonce", _with(EIP1559, nonce=-1), "nonce"),
    ("negative-value", _with(LEGACY, value=-5), "value"),
    ("negative-decimal-string", _with(LEGACY, value="-5"), "value"),
    ("nonce-2**64", _with(EIP1559, nonce=2**64), "nonce"),
    ("nonce-hex-2**64", _with(EIP1559, nonce=hex(2**64)), "nonce"),
    ("gas-2**64", _with(EIP1559, gas=2**64), "gas"),
    ("gasLimit-2**64", _with(LEGACY, gas=DELETE, gasLimit=hex(2**64)), "gasLimit"),
    ("value-2**256", _with(EIP1559, value=2**256), "value"),
    ("gasPrice-2**256", _with(LEGACY, gasPrice=hex(2**256)), "gasPrice"),
    ("maxFee-2**256", _with(EIP1559, maxFeePerGas=str(2**256)), "maxFeePerGas"),
    ("chainId-2**256", _with(EIP1559, chainId=2**256), "chainId"),
    ("huge-decimal", _with(LEGACY, value="9" * 5000), "value"),
    # bad numbers
    ("bool-nonce", _with(EIP1559, nonce=True), "nonce"),
    ("bool-value", _with(LEGACY, value=False), "value"),
    ("float-value", _with(LEGACY, value=1.0), "value"),
    ("float-gas", _with(LEGACY, gas=21000.5), "gas"),
    ("list-value", _with(LEGACY, value=[1]), "value"),
    ("empty-hex", _with(LEGACY, value="0x"), "value"),
    ("bad-hex", _with(LEGACY, value="0xzz"), "value"),
    ("upper-hex-prefix", _with(LEGACY, value="0X10"), "value"),
    ("spaced-decimal", _with(LEGACY, value=" 10"), "value"),
    ("underscore-decimal", _with(LEGACY, value="1_000"), "value"),
    ("unicode-digits", _with(LEGACY, value="١٢"), "value"),
    ("hex-with-space", _with(LEGACY, gas="0x52 08"), "gas"),
    # data
    ("odd-data", _with(LEGACY, data="0x123"), "data"),
    ("unprefixed-data", _with(LEGACY, data="1234"), "data"),
    ("spaced-data", _with(LEGACY, data="0x12 34"), "data"),
    ("bad-input-alias", _with(LEGACY, input="0xgg"), "input"),
    ("bytes-data", _with(LEGACY, data=b"\x01"), "data"),
    # addresses
    ("bad-checksum-to", _with(LEGACY, to=TO[:-1] + "6"), "to"),  # TO ends in 5
    ("wrong-case-to", _with(LEGACY, to=TO[:2] + TO[2].swapcase() + TO[3:]), "to"),
    ("short-to", _with(LEGACY, to=TO[:-2]), "to"),
    ("empty-string-to", _with(LEGACY, to=""), "to"),
    ("int-to", _with(LEGACY, to=0), "to"),
    ("bad-from", _with(LEGACY, **{"from": TO.lower()[:-1] + "x"}), "from"),
    # chain id and fees
    ("chainId-0-typed", _with(EIP1559, chainId=0), "chainId"),
    ("chainId-0-legacy", _with(LEGACY, chainId="0x0"), "chainId"),
    ("chainId-above-EIP-2294-legacy", _with(LEGACY, chainId=hex(MAX_CHAIN_ID + 1)), "chainId"),
    ("chainId-above-EIP-2294-2930", _with(EIP2930, chainId=str(MAX_CHAIN_ID + 1)), "chainId"),
    ("chainId-above-EIP-2294-1559", _with(EIP1559, chainId=MAX_CHAIN_ID + 1), "chainId"),
    ("chainId-2**256-1-legacy", _with(LEGACY, chainId=2**256 - 1), "chainId"),
    ("priority-above-max", _with(EIP1559, maxPriorityFeePerGas="0x3"), "maxPriorityFeePerGas"),
    # access lists
    ("accessList-not-list", _with(EIP2930, accessList={}), "accessList"),
    (
        "accessList-entry-extra",
        _with(EIP2930, accessList=[{**ACCESS_ENTRY, "x": 1}]),
        "accessList[0]",
    ),
    ("accessList-no-keys", _with(EIP2930, accessList=[{"address": TO}]), "accessList[0]"),
    (
        "accessList-bad-address",
        _with(EIP1559, accessList=[ACCESS_ENTRY, {**ACCESS_ENTRY, "address": "0x12"}]),
        "accessList[1].address",
    ),
    (
        "accessList-short-key",
        _with(EIP2930, accessList=[{**ACCESS_ENTRY, "storageKeys": ["0x" + "00" * 31]}]),
        "accessList[0].storageKeys[0]",
    ),
    (
        "accessList-keys-string",
        _with(EIP2930, accessList=[{**ACCESS_ENTRY, "storageKeys": "0x00"}]),
        "accessList[0].storageKeys",
    ),
]


@pytest.mark.parametrize(
    ("data", "field"),
    [pytest.param(data, field, id=name) for name, data, field in BAD_INPUTS],
)
def test_parse_rejects(data: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidField) as caught:
        parse_transaction(data)
    assert caught.value.field == field


@pytest.mark.parametrize("data", [None, [], "0x02", [("nonce", 1)]])
def test_parse_needs_an_object(data: Any) -> None:
    with pytest.raises(InvalidTransaction):
        parse_transaction(data)


def test_every_base_shape_parses() -> None:
    """The shapes the rejection cases start from are themselves valid."""
    assert type(parse_transaction(LEGACY)) is LegacyTransaction
    assert type(parse_transaction(EIP155)) is LegacyTransaction
    assert type(parse_transaction(EIP2930)) is AccessListTransaction
    assert type(parse_transaction(EIP1559)) is DynamicFeeTransaction


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_with(EIP1559, type=DELETE), DynamicFeeTransaction),
        (_with(EIP1559, type=DELETE, maxFeePerGas=DELETE, maxPriorityFeePerGas=DELETE), None),
        (_with(EIP2930, type=DELETE), AccessListTransaction),
        (_with(EIP155, type=None), LegacyTransaction),
        (_with(EIP155, type="0x0"), LegacyTransaction),
        (_with(EIP1559, type="2"), DynamicFeeTransaction),
    ],
)
def test_type_inference(data: dict[str, Any], expected: type | None) -> None:
    if expected is None:  # no fee fields left: legacy, which then lacks gasPrice
        with pytest.raises(InvalidField) as caught:
            parse_transaction(data)
        assert caught.value.field == "gasPrice"
    else:
        assert type(parse_transaction(data)) is expected


def test_values_and_defaults() -> None:
    transaction = parse_transaction(
        {"nonce": "12", "gasLimit": 21000, "gasPrice": "0x00ff", "input": "0xABcd"}
    )
    assert isinstance(transaction, LegacyTransaction)
    assert (transaction.nonce, transaction.gas, transaction.gas_price) == (12, 21000, 255)
    assert (transaction.to, transaction.value, transaction.data) == (None, 0, b"\xab\xcd")
    assert transaction.chain_id is None
    assert parse_transaction({**EIP1559, "to": None}).to is None
    assert parse_transaction({**EIP2930, "data": ""}).data == b""
    biggest = parse_transaction(
        {**EIP1559, "nonce": 2**64 - 1, "gas": hex(2**64 - 1), "value": str(2**256 - 1)}
    )
    assert (biggest.nonce, biggest.gas, biggest.value) == (2**64 - 1, 2**64 - 1, 2**256 - 1)


def test_data_and_input_given_equal_are_one_field() -> None:
    """geth accepts ``data`` and ``input`` together when they are the same bytes."""
    alone = parse_transaction({**EIP1559, "data": "0xabcd"})
    assert parse_transaction({**EIP1559, "data": "0xabcd", "input": "0xABCD"}) == alone
    assert parse_transaction({**EIP1559, "input": "0xabcd", "data": "0xabcd"}) == alone


@pytest.mark.parametrize("base", [LEGACY, EIP155, EIP2930, EIP1559])
def test_to_json_round_trips(base: dict[str, Any]) -> None:
    transaction = parse_transaction({**base, "from": address_of(KEY).lower()})
    if "accessList" in base:
        transaction = parse_transaction({**base, "accessList": [ACCESS_ENTRY, ACCESS_ENTRY]})
    body = transaction.to_json()
    assert parse_transaction(body) == transaction
    assert all(isinstance(value, str | list | None) for value in body.values())


def test_from_is_checked_against_the_signature() -> None:
    transaction = parse_transaction({**EIP1559, "from": address_of(KEY).lower()})
    assert transaction.from_address == address_of(KEY)
    signed = sign(transaction, KEY)
    assert signed.sender == address_of(KEY)
    assert signed.to_dict()["from"] == address_of(KEY)
    with pytest.raises(InvalidSignature):
        sign(transaction, private_key("0x" + "43" * 32))


def test_assemble_refuses_recovery_id_above_1() -> None:
    transaction = parse_transaction(EIP1559)
    with pytest.raises(InvalidSignature):
        transaction.assemble(RecoverableSignature(1, 1, 2))


def test_signed_to_dict() -> None:
    signed = sign(parse_transaction(EIP1559), KEY)
    body = signed.to_dict()
    assert body == {
        "raw_transaction": "0x" + signed.raw.hex(),
        "hash": "0x" + signed.hash.hex(),
        "from": address_of(KEY),
    }
    decoded = signed.to_dict(decoded=True)
    assert parse_transaction(decoded["transaction"]) == signed.transaction
    assert decoded["signature"]["v"] in ("0x0", "0x1")
    assert int(decoded["signature"]["r"], 16) == signed.signature.r


# --- decoding ------------------------------------------------------------------------------


def _fields(raw: bytes) -> tuple[bytes, list[Any]]:
    """(type prefix, RLP items) of a raw transaction, using the rlp library directly."""
    prefix = raw[:1] if raw[0] < 0xC0 else b""
    return prefix, rlp.decode(raw[len(prefix) :])


def _reencode(prefix: bytes, items: list[Any]) -> bytes:
    return prefix + bytes(rlp.encode(items))


SHAPES: dict[str, dict[str, Any]] = {
    "legacy": LEGACY,
    "eip155": EIP155,
    "2930": EIP2930,
    "1559": EIP1559,
}
SIGNED = {name: sign(parse_transaction(data), KEY).raw for name, data in SHAPES.items()}


@pytest.mark.parametrize("name", sorted(SIGNED))
def test_decode_round_trip(name: str) -> None:
    decoded = decode_transaction(SIGNED[name])
    assert decoded.raw == SIGNED[name]
    assert decoded.sender == address_of(KEY)


@pytest.mark.parametrize("name", sorted(SIGNED))
def test_decode_rejects_trailing_bytes(name: str) -> None:
    with pytest.raises(InvalidTransaction):
        decode_transaction(SIGNED[name] + b"\x00")


@pytest.mark.parametrize("name", sorted(SIGNED))
def test_decode_rejects_high_s(name: str) -> None:
    prefix, items = _fields(SIGNED[name])
    v = int.from_bytes(items[-3], "big")
    flipped = v ^ 1 if prefix else (55 - v if v < 35 else v + (1 if (v - 35) % 2 == 0 else -1))
    s = CURVE_ORDER - int.from_bytes(items[-1], "big")
    raw = _reencode(prefix, [*items[:-3], int_to_bytes(flipped), items[-2], int_to_bytes(s)])
    with pytest.raises(InvalidTransaction):
        decode_transaction(raw)


@pytest.mark.parametrize("name", sorted(SIGNED))
@pytest.mark.parametrize("position", [0, -3, -2, -1])
def test_decode_rejects_leading_zero_integers(name: str, position: int) -> None:
    prefix, items = _fields(SIGNED[name])
    items[position] = b"\x00" + items[position]
    with pytest.raises(InvalidTransaction):
        decode_transaction(_reencode(prefix, items))


@pytest.mark.parametrize("name", sorted(SIGNED))
def test_decode_rejects_wrong_field_count(name: str) -> None:
    prefix, items = _fields(SIGNED[name])
    for changed in (items[:-1], [*items, b""]):
        with pytest.raises(InvalidTransaction) as caught:
            decode_transaction(_reencode(prefix, changed))
        assert caught.value.field == "transaction"


@pytest.mark.parametrize(
    ("name", "v"),
    [("legacy", 26), ("legacy", 29), ("legacy", 35), ("legacy", 36), ("1559", 2), ("2930", 27)],
)
def test_decode_rejects_bad_v(name: str, v: int) -> None:
    prefix, items = _fields(SIGNED[name])
    items[-3] = int_to_bytes(v)
    with pytest.raises(InvalidTransaction) as caught:
        decode_transaction(_reencode(prefix, items))
    assert caught.value.field == "v"


@pytest.mark.parametrize("position", [-2, -1])
@pytest.mark.parametrize("value", [0, CURVE_ORDER])
def test_decode_rejects_out_of_range_r_and_s(position: int, value: int) -> None:
    prefix, items = _fields(SIGNED["1559"])
    items[position] = int_to_bytes(value)
    with pytest.raises(InvalidTransaction):
        decode_transaction(_reencode(prefix, items))


def test_decode_rejects_bad_to_and_access_list() -> None:
    prefix, items = _fields(SIGNED["2930"])
    for to in (b"\x01" * 19, b"\x01" * 21, [b""]):
        with pytest.raises(InvalidTransaction) as caught:
            decode_transaction(_reencode(prefix, [*items[:4], to, *items[5:]]))
        assert caught.value.field == "to"
    for access_list, field in (
        ([[b"\x01" * 19, []]], "accessList[0].address"),
        ([[b"\x01" * 20, [b"\x00" * 32, b"\x00" * 31]]], "accessList[0].storageKeys[1]"),
        ([[b"\x01" * 20, b""]], "accessList[0].storageKeys"),
        ([[b"\x01" * 20]], "accessList[0]"),
        ([b"\x01" * 20], "accessList[0]"),
        (b"", "accessList"),
    ):
        with pytest.raises(InvalidTransaction) as caught:
            decode_transaction(_reencode(prefix, [*items[:7], access_list, *items[8:]]))
        assert caught.value.field == field


def test_decode_rejects_priority_fee_above_max() -> None:
    prefix, items = _fields(SIGNED["1559"])
    items[2], items[3] = items[3], items[2]
    with pytest.raises(InvalidTransaction) as caught:
        decode_transaction(_reencode(prefix, items))
    assert caught.value.field == "maxPriorityFeePerGas"


@pytest.mark.parametrize(
    "raw", [b"", b"\x00", b"\x03\xc0", b"\x7f\xc0", b"\x80", bytearray(b"\xc0")]
)
def test_decode_rejects_unknown_envelopes(raw: bytes) -> None:
    with pytest.raises(InvalidTransaction):
        decode_transaction(raw)


def test_decode_checks_chain_id() -> None:
    assert decode_transaction(SIGNED["1559"], chain_id=1).transaction.chain_id == 1
    # pre-EIP-155 transactions name no chain, so pinning one does not refuse them
    assert decode_transaction(SIGNED["legacy"], chain_id=5).transaction.chain_id is None
    for name in ("eip155", "2930", "1559"):
        with pytest.raises(InvalidTransaction) as caught:
            decode_transaction(SIGNED[name], chain_id=5)
        assert caught.value.field == "chainId"


def test_the_eip2294_bound_is_the_largest_chain_id_signed() -> None:
    """At the bound, every type signs and decodes back, and a legacy ``v`` fits in 64 bits."""
    assert MAX_CHAIN_ID == 9223372036854775771
    for base in (EIP155, EIP2930, EIP1559):
        transaction = parse_transaction(_with(base, chainId=hex(MAX_CHAIN_ID)))
        signed = sign(transaction, KEY)
        decoded = decode_transaction(signed.raw, chain_id=MAX_CHAIN_ID)
        assert decoded.transaction == transaction and decoded.sender == address_of(KEY)
    legacy = sign(parse_transaction(_with(EIP155, chainId=MAX_CHAIN_ID)), KEY)
    assert legacy.signature.v in (MAX_CHAIN_ID * 2 + 35, MAX_CHAIN_ID * 2 + 36)
    assert legacy.signature.v < 2**64


def test_decoding_takes_a_chain_id_above_the_bound() -> None:
    """Someone else's transaction may name a larger chain id: decoding it is not signing it."""
    for chain_id in (MAX_CHAIN_ID + 1, 2**254):
        transaction = dataclasses.replace(parse_transaction(EIP155), chain_id=chain_id)
        decoded = decode_transaction(sign(transaction, KEY).raw)
        assert decoded.transaction.chain_id == chain_id


def test_typed_transactions_need_a_chain_id() -> None:
    transaction = parse_transaction(EIP1559)
    with pytest.raises(InvalidField):
        dataclasses.replace(transaction, chain_id=None)


def test_a_known_signer_is_the_sender_without_recovering_it() -> None:
    """A caller that knows which key made the signature (its recovery id was checked against
    that key) names it, and gets the same transaction as recovering the sender would give;
    a transaction whose ``from`` is another address is still refused."""
    transaction = parse_transaction(EIP1559)
    signature = sign_digest_with(KEY, transaction.signing_digest())
    recovered = transaction.assemble(signature)
    named = transaction.assemble(signature, signer=address_of(KEY))
    assert named.to_dict() == recovered.to_dict()
    assert named.raw == recovered.raw and named.hash == recovered.hash
    claimed = parse_transaction(EIP1559 | {"from": "0x" + "11" * 20})
    with pytest.raises(InvalidSignature):
        claimed.assemble(sign_digest_with(KEY, claimed.signing_digest()), signer=address_of(KEY))
