"""EIP-191 personal messages and the EIP-712 signing examples."""

from __future__ import annotations

from typing import Any

import pytest

from signd.chains.ethereum.messages import (
    personal_message_digest,
    recover_message_signer,
    to_eth_signature,
)
from signd.chains.ethereum.typed_data import typed_data_digest
from signd.crypto.secp256k1 import CURVE_ORDER, RecoverableSignature, sign_digest_with
from signd.errors import InvalidField, InvalidSignature
from tests.chains.ethereum.support import address_of, private_key, unhex
from tests.vectors import load_vectors

VECTORS = load_vectors("eth_message_signing.json")
PERSONAL = VECTORS["eip191_personal_sign"]
EIP712 = VECTORS["eip712"]


def _as_int(value: int | str) -> int:
    return value if isinstance(value, int) else int(value, 16)


@pytest.mark.parametrize("case", PERSONAL["sign"], ids=lambda case: case["id"])
def test_personal_sign(case: dict[str, Any]) -> None:
    message = case["message_text"].encode()
    assert message == unhex(case["message_bytes"])
    digest = personal_message_digest(message)
    assert digest == unhex(case["message_hash"])
    signature = sign_digest_with(private_key(case["private_key"]), digest)
    assert (signature.r, signature.s) == (case["r"], case["s"])
    assert to_eth_signature(signature) == unhex(case["signature"])
    assert to_eth_signature(signature)[64] == case["v"]


@pytest.mark.parametrize("case", PERSONAL["hash_text"], ids=lambda case: case["id"])
def test_personal_digest_of_text(case: dict[str, str]) -> None:
    digest = personal_message_digest(case["message_text"].encode("utf-8"))
    assert digest == unhex(case["message_hash"])


@pytest.mark.parametrize("case", PERSONAL["hash_hexstr"], ids=lambda case: case["id"])
def test_personal_digest_of_bytes(case: dict[str, str]) -> None:
    assert personal_message_digest(unhex(case["message_bytes"])) == unhex(case["message_hash"])


@pytest.mark.parametrize("case", PERSONAL["recover"], ids=lambda case: case["id"])
def test_recover_personal_signer(case: dict[str, Any]) -> None:
    digest = personal_message_digest(case["message_text"].encode("utf-8"))
    if "signature" in case:
        signature = unhex(case["signature"])
    else:
        signature = (
            _as_int(case["r"]).to_bytes(32, "big")
            + _as_int(case["s"]).to_bytes(32, "big")
            + bytes([case["v"]])
        )
    assert recover_message_signer(digest, signature) == case["expected_address"]


def test_recover_accepts_v_0_1_27_28_alike() -> None:
    key = private_key("0x" + "11" * 32)
    digest = personal_message_digest(b"hello")
    signature = to_eth_signature(sign_digest_with(key, digest))
    parity = signature[64] - 27
    for v in (parity, parity + 27):
        assert recover_message_signer(digest, signature[:64] + bytes([v])) == address_of(key)
    other = recover_message_signer(digest, signature[:64] + bytes([1 - parity]))
    assert other != address_of(key)


@pytest.mark.parametrize("v", [2, 26, 29, 35, 255])
def test_recover_rejects_bad_v(v: int) -> None:
    signature = to_eth_signature(sign_digest_with(private_key("0x" + "11" * 32), bytes(32)))
    with pytest.raises(InvalidSignature):
        recover_message_signer(bytes(32), signature[:64] + bytes([v]))


def test_recover_rejects_high_s_and_bad_lengths() -> None:
    signature = sign_digest_with(private_key("0x" + "11" * 32), bytes(32))
    high_s = (
        signature.r.to_bytes(32, "big")
        + (CURVE_ORDER - signature.s).to_bytes(32, "big")
        + bytes([28 - signature.recovery_id])
    )
    with pytest.raises(InvalidSignature):
        recover_message_signer(bytes(32), high_s)
    with pytest.raises(InvalidSignature):
        recover_message_signer(bytes(32), to_eth_signature(signature)[:64])
    with pytest.raises(InvalidField):
        recover_message_signer(bytes(31), to_eth_signature(signature))


def test_personal_digest_needs_bytes() -> None:
    with pytest.raises(InvalidField) as caught:
        personal_message_digest("text")  # type: ignore[arg-type]
    assert caught.value.field == "message"


def test_to_eth_signature_refuses_recovery_ids_above_1() -> None:
    with pytest.raises(InvalidSignature):
        to_eth_signature(RecoverableSignature(1, 1, 2))


def test_eip712_spec_mail_signature() -> None:
    case = EIP712["spec_mail_example"]
    key = private_key(case["private_key"])
    assert address_of(key) == case["address"]
    digest = typed_data_digest(case["typed_data"])
    assert digest == unhex(case["signHash"])
    signature = to_eth_signature(sign_digest_with(key, digest))
    assert signature == unhex(case["signature"])
    assert recover_message_signer(digest, signature) == case["address"]


@pytest.mark.parametrize("case", EIP712["eth_account_sign_typed_data"], ids=lambda c: c["id"])
def test_eip712_eth_account_signatures(case: dict[str, Any]) -> None:
    key = private_key(case["private_key"])
    assert address_of(key) == case["address"]
    signature = to_eth_signature(sign_digest_with(key, typed_data_digest(case["typed_data"])))
    assert signature == unhex(case["expected_signature"])
