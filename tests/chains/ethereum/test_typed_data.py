"""EIP-712: ethers' 130 cases, the spec's Mail example, eth-account's invalid messages."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from signd.chains.ethereum.typed_data import (
    domain_separator,
    encode_data,
    encode_type,
    hash_struct,
    parse_typed_data,
    type_hash,
    typed_data_digest,
)
from signd.crypto.hashing import keccak256
from signd.errors import InvalidField, InvalidTypedData
from tests.chains.ethereum.support import unhex
from tests.vectors import load_vectors

ETHERS = load_vectors("eip712_ethers_typed_data.json")["cases"]
INVALID = load_vectors("eip712_invalid_messages_eth_account.json")["cases"]
MAIL = load_vectors("eth_message_signing.json")["eip712"]["spec_mail_example"]


@pytest.mark.parametrize("case", ETHERS, ids=lambda case: case["name"])
def test_ethers_typed_data(case: dict[str, Any]) -> None:
    document = {
        "types": case["types"],
        "primaryType": case["primaryType"],
        "domain": case["domain"],
        "message": case["data"],
    }
    assert typed_data_digest(document) == unhex(case["digest"])
    assert encode_data(case["primaryType"], case["types"], case["data"]) == unhex(case["encoded"])


def test_mail_example_step_by_step() -> None:
    document = MAIL["typed_data"]
    types, message = document["types"], document["message"]
    assert encode_type("Mail", types) == MAIL["encodeType_Mail"]
    assert type_hash("Mail", types) == unhex(MAIL["typeHash_Mail"])
    assert encode_data("Mail", types, message) == unhex(MAIL["encodeData_Mail"])
    assert hash_struct("Mail", types, message) == unhex(MAIL["hashStruct_Mail"])
    assert domain_separator(document["domain"], types) == unhex(MAIL["domainSeparator"])
    # the same domain type, inferred from the domain's keys
    assert domain_separator(document["domain"]) == unhex(MAIL["domainSeparator"])
    assert typed_data_digest(document) == unhex(MAIL["signHash"])


@pytest.mark.parametrize("name", sorted(INVALID))
def test_eth_account_invalid_messages(name: str) -> None:
    with pytest.raises(InvalidTypedData):
        typed_data_digest(INVALID[name])


def _mail(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = copy.deepcopy(MAIL["typed_data"])
    for path, value in changes.items():
        *parents, last = path.split("__")
        target: Any = document
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if value is _DELETE:
            del target[last]
        elif isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return document


_DELETE = object()
_PERSON_BALANCE = [{"name": "name", "type": "string"}, {"name": "balance", "type": "uint8"}]
_PERSON_WALLET = [{"name": "name", "type": "string"}, {"name": "wallet", "type": "address"}]


@pytest.mark.parametrize(
    ("document", "field"),
    [
        pytest.param(_mail(message__to__wallet=_DELETE), "message.to.wallet", id="missing-field"),
        pytest.param(_mail(message__cc=[]), "message", id="extra-field"),
        pytest.param(_mail(message__to="Bob"), "message.to", id="struct-not-object"),
        pytest.param(_mail(message__contents=7), "message.contents", id="string-not-str"),
        pytest.param(
            _mail(message__to__wallet="0xbBbBBBBbbBBBbbbBbbBbbbbBBbBbbbbBbBbbBBbb"),
            "message.to.wallet",
            id="bad-checksum",
        ),
        pytest.param(_mail(message__to__wallet="0x1234"), "message.to.wallet", id="short-address"),
        pytest.param(_mail(primaryType="Letter"), "primaryType", id="undefined-primary"),
        pytest.param(_mail(primaryType=3), "primaryType", id="primary-not-str"),
        pytest.param(_mail(domain__chainId="one"), "domain.chainId", id="bad-chain-id"),
        pytest.param(_mail(domain__chainId=True), "domain.chainId", id="bool-chain-id"),
        pytest.param(_mail(domain__chainId=-1), "domain.chainId", id="negative-uint"),
        pytest.param(_mail(domain__chainId=2**256), "domain.chainId", id="uint256-overflow"),
        pytest.param(
            _mail(types__Person=[*_PERSON_BALANCE[:1], {"name": "name", "type": "string"}]),
            "types.Person[1]",
            id="duplicate-field",
        ),
        pytest.param(
            _mail(types__Person__1={"name": "wallet", "type": "address", "x": 1}),
            "types.Person[1]",
            id="extra-type-key",
        ),
        pytest.param(_mail(types__Person__1__type="uint7"), "types.Person[1].type", id="uint7"),
        pytest.param(_mail(types__Person__1__type="bytes33"), "types.Person[1].type", id="bytes33"),
        pytest.param(_mail(types__Person__1__type="bytes0"), "types.Person[1].type", id="bytes0"),
        pytest.param(_mail(types__Person__1__type="int"), "types.Person[1].type", id="bare-int"),
        pytest.param(
            _mail(types__Person__1__type="address[0]"), "types.Person[1].type", id="zero-array"
        ),
        pytest.param(_mail(types__Person=7), "types.Person", id="type-not-list"),
        pytest.param(_mail(types=[]), "types", id="types-not-object"),
        pytest.param(_mail(domain=[]), "domain", id="domain-not-object"),
        pytest.param(_mail(domain__salt="0x" + "00" * 32), "domain", id="domain-key-not-in-type"),
    ],
)
def test_invalid_documents(document: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidTypedData) as caught:
        typed_data_digest(document)
    assert caught.value.field == field


def _values_document(type_name: str, value: Any) -> dict[str, Any]:
    return {
        "types": {"Values": [{"name": "v", "type": type_name}]},
        "primaryType": "Values",
        "domain": {"name": "signd"},
        "message": {"v": value},
    }


@pytest.mark.parametrize(
    ("type_name", "value"),
    [
        ("uint8", 256),
        ("uint8", "256"),
        ("uint8", "0x100"),
        ("uint8", -1),
        ("uint8", "-1"),
        ("int8", 128),
        ("int8", -129),
        ("int8", "-0x1"),
        ("int256", 2**255),
        ("uint256", 1.0),
        ("uint256", " 1"),
        ("uint256", "1e3"),
        ("uint256", True),
        ("uint256", None),
        ("bool", 1),
        ("bool", "true"),
        ("bytes4", "0x010203"),
        ("bytes4", "0x0102030405"),
        ("bytes4", "01020304"),
        ("bytes", "0x123"),
        ("bytes", "hello"),
        ("string", b"bytes"),
        ("string", "\ud800"),
        ("address[2]", ["0x" + "11" * 20]),
        ("address[]", "0x" + "11" * 20),
        ("string[][]", ["a"]),
    ],
)
def test_invalid_values(type_name: str, value: Any) -> None:
    with pytest.raises(InvalidTypedData) as caught:
        typed_data_digest(_values_document(type_name, value))
    assert caught.value.field is not None
    assert caught.value.field.startswith("message.v")


@pytest.mark.parametrize(
    ("type_name", "value", "field"),
    [
        ("address[][]", [["0x" + "11" * 20], ["0x" + "11" * 20, "0x12"]], "message.v[1][1]"),
        ("uint8[2][]", [[1, 2], [3]], "message.v[1]"),
        (
            "Person[]",
            [{"name": "A", "wallet": "0x" + "11" * 20}, {"name": "B"}],
            "message.v[1].wallet",
        ),
        ("Person[1]", [{"name": "A", "wallet": 7}], "message.v[0].wallet"),
    ],
)
def test_an_error_names_the_place_of_the_value(type_name: str, value: Any, field: str) -> None:
    document = _values_document(type_name, value)
    document["types"]["Person"] = _PERSON_WALLET
    with pytest.raises(InvalidTypedData) as caught:
        typed_data_digest(document)
    assert caught.value.field == field
    assert caught.value.message.startswith(field)


@pytest.mark.parametrize(
    ("type_name", "value"),
    [
        ("uint8", 255),
        ("uint8", "0xff"),
        ("int8", "-128"),
        ("int8", 127),
        ("uint256", "0x" + "ff" * 32),
        ("bytes1", "0x00"),
        ("bytes32", "0x" + "ab" * 32),
        ("bytes", "0x"),
        ("string", ""),
        ("bool[2][1]", [[True, False]]),
        ("address", "0x" + "AB" * 20),
    ],
)
def test_valid_boundary_values(type_name: str, value: Any) -> None:
    assert len(typed_data_digest(_values_document(type_name, value))) == 32


@pytest.mark.parametrize("digits", [4, 5_000])
def test_an_integer_type_of_many_digits_is_undefined(digits: int) -> None:
    """``uint9999`` is no type (at most 256 bits), whatever the number of digits: 5,000
    digits once overflowed int() and answered 500."""
    type_name = "uint" + "9" * digits
    with pytest.raises(InvalidTypedData) as caught:
        typed_data_digest(_values_document(type_name, 1))
    assert caught.value.field == "types.Values[0].type"
    document = _values_document("bool", True)
    document["types"][type_name] = []  # not an atomic type: a struct may take the name
    assert len(typed_data_digest(document)) == 32


def test_document_shape() -> None:
    document = MAIL["typed_data"]
    with pytest.raises(InvalidTypedData):
        typed_data_digest({**document, "extra": 1})
    with pytest.raises(InvalidTypedData):
        typed_data_digest({key: document[key] for key in ("types", "primaryType", "domain")})
    with pytest.raises(InvalidTypedData):
        typed_data_digest([])  # type: ignore[arg-type]


def test_unknown_domain_key_when_inferring() -> None:
    types = {key: value for key, value in MAIL["typed_data"]["types"].items()}
    del types["EIP712Domain"]
    document = {**MAIL["typed_data"], "types": types}
    assert typed_data_digest(document) == unhex(MAIL["signHash"])
    with pytest.raises(InvalidTypedData) as caught:
        typed_data_digest({**document, "domain": {**document["domain"], "chain": 1}})
    assert caught.value.field == "domain.chain"


@pytest.mark.parametrize("value", [None, 1, "x"])
@pytest.mark.parametrize("inferred", [False, True])
def test_a_domain_key_the_domain_type_lacks_is_refused_even_when_null(
    value: Any, inferred: bool
) -> None:
    """A key that is not a field of EIP712Domain is not signed, so it is refused (as
    eth-account and ethers refuse it), whether the domain type is given or inferred, and
    even when its value is null, which otherwise means "absent"."""
    document: dict[str, Any] = copy.deepcopy(MAIL["typed_data"])
    if inferred:
        del document["types"]["EIP712Domain"]
    document["domain"]["0"] = value
    with pytest.raises(InvalidTypedData) as caught:
        typed_data_digest(document)
    assert caught.value.field == ("domain.0" if inferred else "domain")
    with pytest.raises(InvalidTypedData):
        domain_separator(document["domain"], document["types"])


@pytest.mark.parametrize("inferred", [False, True])
def test_a_null_standard_domain_field_is_absent(inferred: bool) -> None:
    document: dict[str, Any] = copy.deepcopy(MAIL["typed_data"])
    if inferred:
        del document["types"]["EIP712Domain"]
    document["domain"]["salt"] = None
    assert typed_data_digest(document) == unhex(MAIL["signHash"])


@pytest.mark.parametrize("message", [{}, _DELETE], ids=["empty", "absent"])
def test_domain_only_primary_type(message: Any) -> None:
    """``primaryType: EIP712Domain`` signs keccak256(0x1901 ‖ domainSeparator), as MetaMask
    does, with a message that is empty or absent."""
    document = _mail(primaryType="EIP712Domain", message=message)
    expected = keccak256(b"\x19\x01" + unhex(MAIL["domainSeparator"]))
    assert typed_data_digest(document) == expected


@pytest.mark.parametrize(
    "message",
    [MAIL["typed_data"]["message"], {"contents": "pay Bob"}, "pay Bob", [], None, 0],
    ids=["mail", "object", "string", "list", "null", "zero"],
)
def test_domain_only_primary_type_refuses_a_message(message: Any) -> None:
    """A message beside ``primaryType: EIP712Domain`` would not be signed, yet it is what a
    reader of the request takes the signature for."""
    document = _mail(primaryType="EIP712Domain", message=message)
    with pytest.raises(InvalidTypedData) as caught:
        typed_data_digest(document)
    assert caught.value.field == "message"


def test_only_a_domain_only_document_may_leave_the_message_out() -> None:
    with pytest.raises(InvalidTypedData) as caught:
        typed_data_digest(_mail(message=_DELETE))
    assert caught.value.field is None


def test_recursive_types_and_depth_limit() -> None:
    types = {"Node": [{"name": "value", "type": "uint8"}, {"name": "next", "type": "Node[]"}]}
    assert encode_type("Node", types) == "Node(uint8 value,Node[] next)"
    node: dict[str, Any] = {"value": 1, "next": []}
    for _ in range(10):
        node = {"value": 2, "next": [node]}
    assert len(hash_struct("Node", types, node)) == 32
    for _ in range(100):
        node = {"value": 3, "next": [node]}
    with pytest.raises(InvalidTypedData):
        hash_struct("Node", types, node)


def _on_chain(declared: str | None, chain_id: Any) -> dict[str, Any]:
    """The Mail example with its domain's chainId declared as ``declared`` (``None``: no
    EIP712Domain type, so the standard uint256 is inferred) and given as ``chain_id``."""
    document: dict[str, Any] = copy.deepcopy(MAIL["typed_data"])
    if declared is None:
        del document["types"]["EIP712Domain"]
    else:
        for field in document["types"]["EIP712Domain"]:
            if field["name"] == "chainId":
                field["type"] = declared
    document["domain"]["chainId"] = chain_id
    return document


@pytest.mark.parametrize(
    ("declared", "value", "expected"),
    [
        ("uint256", 1, 1),
        ("uint256", "1", 1),
        ("uint256", "0x1", 1),
        ("uint256", "0x0001", 1),
        (None, "0x89", 137),
        ("uint8", "0xff", 255),
        ("uint64", "137", 137),
        (None, None, None),  # a null standard field is absent
    ],
)
def test_the_chain_id_is_the_integer_signed(
    declared: str | None, value: Any, expected: int | None
) -> None:
    typed = parse_typed_data(_on_chain(declared, value))
    assert typed.chain_id() == expected
    if expected is not None:  # the same number, written as an int, signs the same digest
        assert parse_typed_data(_on_chain(declared, expected)).digest == typed.digest


@pytest.mark.parametrize(
    ("declared", "value"),
    [
        ("string", "1"),
        ("string", " 1"),
        ("string", "0x1"),
        ("bytes32", "0x" + "00" * 31 + "01"),
        ("bytes", "0x01"),
        ("address", "0x" + "00" * 19 + "01"),
        ("int256", 1),
        ("uint256[]", [1]),
        ("bool", True),
    ],
)
def test_a_chain_id_of_another_type_names_no_chain(declared: str, value: Any) -> None:
    """The document is valid and has a digest, but over text or bytes that only look like
    chain 1: asked which chain it is for, it names none."""
    typed = parse_typed_data(_on_chain(declared, value))
    with pytest.raises(InvalidField) as caught:
        typed.chain_id()
    assert (caught.value.code, caught.value.field) == ("invalid_field", "domain.chainId")
    assert repr(declared) in caught.value.message


def test_a_chain_id_of_a_struct_type_named_like_an_integer_names_no_chain() -> None:
    document = _on_chain("uint512", {"n": 1})  # no atomic type: a struct may take the name
    document["types"]["uint512"] = [{"name": "n", "type": "uint8"}]
    with pytest.raises(InvalidField):
        parse_typed_data(document).chain_id()
