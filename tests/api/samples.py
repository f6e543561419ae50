"""Documents the service tests sign, and helpers that check signatures with eth-account."""

from __future__ import annotations

from typing import Any

from eth_account import Account
from eth_account.messages import encode_defunct, encode_typed_data
from eth_keys import keys

MAIL: dict[str, Any] = {
    "types": {
        "EIP712Domain": [
            {"name": "name", "type": "string"},
            {"name": "version", "type": "string"},
            {"name": "chainId", "type": "uint256"},
            {"name": "verifyingContract", "type": "address"},
        ],
        "Person": [{"name": "name", "type": "string"}, {"name": "wallet", "type": "address"}],
        "Mail": [
            {"name": "from", "type": "Person"},
            {"name": "to", "type": "Person"},
            {"name": "contents", "type": "string"},
        ],
    },
    "primaryType": "Mail",
    "domain": {
        "name": "Ether Mail",
        "version": "1",
        "chainId": 1,
        "verifyingContract": "0xCcCCccccCCCCcCCCCCCcCcCccCcCCCcCcccccccC",
    },
    "message": {
        "from": {"name": "Cow", "wallet": "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826"},
        "to": {"name": "Bob", "wallet": "0xbBbBBBBbbBBBbbbBbbBbbbbBBbBbbbbBbBbbBBbB"},
        "contents": "Hello, Bob!",
    },
}


def transaction(chain_id: int = 1, nonce: int = 0) -> dict[str, Any]:
    return {
        "type": "0x2",
        "chainId": hex(chain_id),
        "nonce": hex(nonce),
        "to": "0x3535353535353535353535353535353535353535",
        "value": hex(10**15),
        "gas": hex(21000),
        "maxFeePerGas": hex(30 * 10**9),
        "maxPriorityFeePerGas": hex(10**9),
    }


def hash_signer(digest: bytes, result: dict[str, Any]) -> str:
    signature = keys.Signature(
        vrs=(result["recovery_id"], int(result["r"], 16), int(result["s"], 16))
    )
    return str(signature.recover_public_key_from_msg_hash(digest).to_checksum_address())


def text_signer(text: str, signature: str) -> str:
    return str(Account.recover_message(encode_defunct(text=text), signature=signature))


def bytes_signer(data: bytes, signature: str) -> str:
    return str(Account.recover_message(encode_defunct(primitive=data), signature=signature))


def typed_data_signer(document: dict[str, Any], signature: str) -> str:
    return str(
        Account.recover_message(encode_typed_data(full_message=document), signature=signature)
    )


def transaction_signer(raw: str) -> str:
    return str(Account.recover_transaction(raw))
