"""Addresses: EIP-55 vectors, ethers key→address vectors, strict parsing."""

from __future__ import annotations

import pytest

from signd.chains import address_deriver
from signd.chains.ethereum.address import (
    address_from_public_key,
    canonical_address,
    parse_address,
    to_checksum_address,
)
from signd.errors import InvalidField
from tests.chains.ethereum.support import private_key
from tests.vectors import load_vectors

EIP55 = load_vectors("eip55_checksum.json")["cases"]
ACCOUNTS = load_vectors("eth_accounts_ethers.json")["cases"]


@pytest.mark.parametrize("case", EIP55, ids=lambda case: case["address"])
def test_eip55_vectors(case: dict[str, str]) -> None:
    address = case["address"]
    assert to_checksum_address(address.lower()) == address
    assert to_checksum_address(bytes.fromhex(address[2:])) == address
    assert parse_address(address) == bytes.fromhex(address[2:])
    assert canonical_address(address.lower()) == address


@pytest.mark.parametrize("case", ACCOUNTS, ids=lambda case: case["name"])
def test_ethers_accounts(case: dict[str, str]) -> None:
    public = private_key(case["privateKey"]).public_key
    assert address_from_public_key(public.format(compressed=True)) == case["address"]
    assert address_from_public_key(public.format(compressed=False)) == case["address"]


def test_address_deriver() -> None:
    case = ACCOUNTS[0]
    public = private_key(case["privateKey"]).public_key.format()
    assert address_deriver("ethereum")(public) == case["address"]


@pytest.mark.parametrize("chain", ["bitcoin-ish", "", "Ethereum"])
def test_address_deriver_rejects_unknown_chains(chain: str) -> None:
    with pytest.raises(InvalidField) as caught:
        address_deriver(chain)
    assert caught.value.field == "chain"


def test_mixed_case_needs_a_valid_checksum() -> None:
    good = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
    assert parse_address(good.lower()) == parse_address(good.upper().replace("0X", "0x"))
    broken = good[:-1] + good[-1].swapcase()
    with pytest.raises(InvalidField) as caught:
        parse_address(broken, field="recipient")
    assert caught.value.field == "recipient"
    assert "checksum" in caught.value.message


@pytest.mark.parametrize(
    "value",
    [
        None,
        20,
        b"\x00" * 20,
        "",
        "0x",
        "5aaeb6053f3e94c9b9a09f33669435e7ef1beaed",
        "0X5aaeb6053f3e94c9b9a09f33669435e7ef1beaed",
        "0x5aaeb6053f3e94c9b9a09f33669435e7ef1bea",
        "0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed00",
        "0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaeg",
        "0x5aaeb6053f3e94c9b9a09f33669435e7ef1bea d",
    ],
)
def test_parse_address_rejects_malformed(value: object) -> None:
    with pytest.raises(InvalidField) as caught:
        parse_address(value, field="to")
    assert caught.value.field == "to"


@pytest.mark.parametrize("public_key", [b"", b"\x02" + b"\x00" * 32, b"\x04" + b"\x01" * 64])
def test_address_from_invalid_public_key(public_key: bytes) -> None:
    with pytest.raises(InvalidField) as caught:
        address_from_public_key(public_key)
    assert caught.value.field == "public_key"


def test_to_checksum_address_rejects_wrong_length_bytes() -> None:
    with pytest.raises(InvalidField):
        to_checksum_address(b"\x00" * 19)
