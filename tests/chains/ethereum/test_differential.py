"""Differential tests: signd against eth-account on random transactions and typed data."""

from __future__ import annotations

import random
from typing import Any

import pytest
from eth_account import Account
from eth_account._utils.encode_typed_data.encoding_and_hashing import hash_domain
from eth_account.messages import _hash_eip191_message, encode_typed_data
from eth_utils import ValidationError, keccak

from signd.chains.ethereum.address import to_checksum_address
from signd.chains.ethereum.transactions import (
    MAX_CHAIN_ID,
    decode_transaction,
    parse_transaction,
)
from signd.chains.ethereum.typed_data import typed_data_digest
from signd.crypto.secp256k1 import CURVE_ORDER
from signd.errors import InvalidField, InvalidTypedData
from tests.chains.ethereum.support import address_of, private_key, sign

KINDS = ("legacy", "eip155", "eip2930", "eip1559")
CASES_PER_KIND = 100


def _number(rng: random.Random, bits: int) -> int:
    """Small, boundary and full-width values alike."""
    return rng.choice(
        [0, 1, rng.randrange(256), rng.randrange(1 << bits), (1 << bits) - 1, 1 << (bits - 1)]
    )


def _as_json(rng: random.Random, value: int) -> int | str:
    """The same number the ways wallets write it: int, hex or decimal string."""
    forms: list[int | str] = [value, hex(value), str(value)]
    return rng.choice(forms)


def _address(rng: random.Random) -> str:
    return to_checksum_address(rng.randbytes(20))


def _random_transaction(rng: random.Random, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(eth-account dict with ints, signd wallet JSON) for one random transaction."""
    ours: dict[str, Any] = {}
    theirs: dict[str, Any] = {
        "nonce": _number(rng, 64),
        "gas": _number(rng, 64),
        "value": _number(rng, 256),
        "data": "0x" + rng.randbytes(rng.choice([0, 1, 31, 55, 56, 200, 1100])).hex(),
    }
    if rng.random() < 0.8:
        theirs["to"] = _address(rng)
    if kind != "legacy":
        theirs["chainId"] = rng.choice(
            [1, 5, 1337, 11155111, MAX_CHAIN_ID, rng.randrange(1, 1 << 64)]
        )
    if kind in ("legacy", "eip155", "eip2930"):
        theirs["gasPrice"] = _number(rng, 256)
    if kind == "eip1559":
        theirs["maxFeePerGas"] = _number(rng, 256)
        theirs["maxPriorityFeePerGas"] = rng.randint(0, theirs["maxFeePerGas"])
    if kind in ("eip2930", "eip1559"):
        theirs["type"] = 1 if kind == "eip2930" else 2
        theirs["accessList"] = [
            {
                "address": _address(rng),
                "storageKeys": ["0x" + rng.randbytes(32).hex() for _ in range(rng.randrange(4))],
            }
            for _ in range(rng.randrange(4))
        ]
    for key, value in theirs.items():
        ours[key] = _as_json(rng, value) if isinstance(value, int) else value
    if "data" in ours and rng.random() < 0.3:
        ours["input"] = ours.pop("data")
    if rng.random() < 0.3:
        ours["gasLimit"] = ours.pop("gas")
    if "to" not in ours and rng.random() < 0.5:
        ours["to"] = None
    if "type" in ours and rng.random() < 0.3:
        del ours["type"]  # inferred from accessList / maxFeePerGas
    return theirs, ours


@pytest.mark.parametrize("kind", KINDS)
def test_transactions_match_eth_account(kind: str) -> None:
    """signd signs what eth-account signs, and decodes what it signed; above EIP-2294's chain
    id bound, which eth-account does not apply, signd decodes the transaction but refuses to
    sign one."""
    rng = random.Random(f"signd-differential-{kind}")
    for _ in range(CASES_PER_KIND):
        secret = rng.randrange(1, CURVE_ORDER).to_bytes(32, "big")
        theirs, ours = _random_transaction(rng, kind)
        expected = Account.sign_transaction(theirs, secret)
        key = private_key(secret)
        decoded = decode_transaction(bytes(expected.raw_transaction))
        assert decoded.sender == address_of(key) == Account.from_key(secret).address
        if theirs.get("chainId", 0) > MAX_CHAIN_ID:
            assert decoded.transaction.chain_id == theirs["chainId"]
            with pytest.raises(InvalidField, match="EIP-2294"):
                parse_transaction(ours)
            continue
        signed = sign(parse_transaction(ours), key)
        assert signed.raw == bytes(expected.raw_transaction), (theirs, ours)
        assert signed.hash == bytes(expected.hash)
        assert decoded.transaction == signed.transaction


# --- EIP-712 ---------------------------------------------------------------------------------

ATOMIC = ["address", "bool", "string", "bytes", "bytes1", "bytes7", "bytes32"]
ATOMIC += ["uint8", "uint64", "uint256", "int8", "int128", "int256"]


def _random_value(rng: random.Random, type_name: str, types: dict[str, Any]) -> Any:
    if type_name.endswith("]"):
        element, _, size = type_name[:-1].rpartition("[")
        count = int(size) if size else rng.randrange(4)
        return [_random_value(rng, element, types) for _ in range(count)]
    if type_name in types:
        return {f["name"]: _random_value(rng, f["type"], types) for f in types[type_name]}
    if type_name == "address":
        return rng.choice([_address(rng), _address(rng).lower()])
    if type_name == "bool":
        return rng.random() < 0.5
    if type_name == "string":
        return "".join(rng.choice("abcé🚀 \u0000") for _ in range(rng.randrange(40)))
    if type_name == "bytes":
        return "0x" + rng.randbytes(rng.randrange(70)).hex()
    if type_name.startswith("bytes"):
        return "0x" + rng.randbytes(int(type_name[5:])).hex()
    bits = int(type_name.lstrip("uint"))
    if type_name.startswith("u"):
        return rng.choice([0, (1 << bits) - 1, rng.randrange(1 << bits)])
    low, high = -(1 << (bits - 1)), 1 << (bits - 1)
    return rng.choice([low, high - 1, -1, rng.randrange(low, high)])


def _random_document(rng: random.Random) -> dict[str, Any]:
    types: dict[str, Any] = {}
    names = [f"S{index}" for index in range(rng.randrange(1, 4))]
    for position, name in enumerate(names):
        field_types = list(ATOMIC) + names[position + 1 :]  # only later structs: no cycles
        # each struct uses the next one, so S0 is the only root (eth-account insists on that)
        chosen = [rng.choice(field_types) for _ in range(rng.randrange(1, 6))]
        if position + 1 < len(names):
            chosen.insert(rng.randrange(len(chosen) + 1), names[position + 1])
        fields = []
        for number, type_name in enumerate(chosen):
            for _ in range(rng.choice([0, 0, 1, 2])):
                type_name += rng.choice(["[]", "[2]", "[1]"])
            fields.append({"name": f"f{number}", "type": type_name})
        types[name] = fields
    domain = {
        "name": "signd",
        "version": "1",
        "chainId": rng.randrange(1, 1 << 32),
        "verifyingContract": _address(rng),
        "salt": "0x" + rng.randbytes(32).hex(),
    }
    domain = {key: value for key, value in domain.items() if rng.random() < 0.7}
    return {
        "types": types,
        "primaryType": names[0],
        "domain": domain,
        "message": _random_value(rng, names[0], types),
    }


def test_typed_data_matches_eth_account() -> None:
    rng = random.Random("signd-differential-eip712")
    for _ in range(150):
        document = _random_document(rng)
        expected = _hash_eip191_message(encode_typed_data(full_message=document))
        assert typed_data_digest(document) == bytes(expected), document


def test_a_domain_only_document_with_a_message_is_refused_as_eth_account_refuses_it() -> None:
    """eth-account refuses every ``primaryType: EIP712Domain`` document. signd signs one only
    without a message (as MetaMask does, over keccak256(0x1901 ‖ domainSeparator)), with
    eth-account's domain separator."""
    rng = random.Random("signd-differential-eip712-domain-only")
    for _ in range(50):
        document = {**_random_document(rng), "primaryType": "EIP712Domain"}
        with pytest.raises(ValidationError):
            encode_typed_data(full_message=document)
        with pytest.raises(InvalidTypedData):
            typed_data_digest(document)
        separator = hash_domain(document["domain"])
        expected = keccak(b"\x19\x01" + separator)
        assert typed_data_digest({**document, "message": {}}) == expected, document
