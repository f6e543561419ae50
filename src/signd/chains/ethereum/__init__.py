"""Ethereum: EIP-55 addresses, legacy/EIP-2930/EIP-1559 transactions, EIP-191 and EIP-712."""

from __future__ import annotations

from signd.chains.ethereum.address import (
    address_from_public_key,
    canonical_address,
    parse_address,
    to_checksum_address,
)
from signd.chains.ethereum.messages import (
    personal_message_digest,
    recover_message_signer,
    to_eth_signature,
)
from signd.chains.ethereum.transactions import (
    SignedTransaction,
    UnsignedTransaction,
    decode_transaction,
    parse_transaction,
)
from signd.chains.ethereum.typed_data import typed_data_digest

__all__ = [
    "SignedTransaction",
    "UnsignedTransaction",
    "address_from_public_key",
    "canonical_address",
    "decode_transaction",
    "parse_address",
    "parse_transaction",
    "personal_message_digest",
    "recover_message_signer",
    "to_checksum_address",
    "to_eth_signature",
    "typed_data_digest",
]
