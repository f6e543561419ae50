"""``signd demo``: the whole address-and-sign path on a throwaway home, checked independently."""

from __future__ import annotations

import secrets
import tempfile
from pathlib import Path
from typing import Any

from signd.chains.ethereum.messages import personal_message_digest, recover_message_signer
from signd.chains.ethereum.transactions import decode_transaction
from signd.cli.output import emit, stdout
from signd.config import load_settings
from signd.crypto.secret import Secret
from signd.errors import InvalidSignature
from signd.operations.backends import build_signer

DEMO_MESSAGE = "signd demo: I control this address"


def _demo_transaction(chain_id: int = 1) -> dict[str, Any]:
    return {
        "type": 2,
        "chainId": chain_id,
        "nonce": 0,
        "to": "0x" + secrets.token_bytes(20).hex(),
        "value": 10**16,
        "gas": 21000,
        "maxFeePerGas": 30 * 10**9,
        "maxPriorityFeePerGas": 10**9,
        "data": "0x",
    }


def _independent_checks(raw: bytes, signature: bytes, address: str) -> list[str]:
    """Recover both signers with eth-account when it is installed (it is a separate codebase)."""
    try:
        from eth_account import Account
        from eth_account.messages import encode_defunct
    except ImportError:
        return ["eth-account not installed: skipped the independent library check"]
    tx_sender = Account.recover_transaction(raw)
    msg_signer = Account.recover_message(encode_defunct(text=DEMO_MESSAGE), signature=signature)
    if tx_sender != address or msg_signer != address:
        raise InvalidSignature("eth-account recovered a different signer")
    return [
        f"eth-account recovers the transaction sender: {tx_sender}",
        f"eth-account recovers the message signer: {msg_signer}",
    ]


def run_demo(*, as_json: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="signd-demo-") as tmp:
        home = Path(tmp)
        passphrase = Secret(secrets.token_urlsafe(24))
        settings = load_settings(home)
        with build_signer(settings, passphrase=lambda creating: passphrase) as signer:
            (key,) = signer.create_keys(chain="ethereum", custody="keystore")
            tx = _demo_transaction()
            signed = signer.sign_eth_transaction(key.key_id, tx)
            message = signer.sign_eth_message(key.address, DEMO_MESSAGE.encode())
            (enclave_key,) = signer.create_keys(chain="ethereum", custody="enclave")
            enclave_signed = signer.sign_eth_transaction(enclave_key.address, tx)

        decoded = decode_transaction(signed.raw)
        recovered = recover_message_signer(
            personal_message_digest(DEMO_MESSAGE.encode()), message.signature
        )
        if decoded.sender != key.address or recovered != key.address:
            raise InvalidSignature("signd's own decoder recovered a different signer")
        enclave_sender = decode_transaction(enclave_signed.raw).sender
        if enclave_sender != enclave_key.address:
            raise InvalidSignature("the enclave-signed transaction recovers a different signer")
        checks = [
            f"signd decodes the raw transaction and recovers {decoded.sender}",
            f"libsecp256k1 recovers the message signer {recovered}",
            *_independent_checks(signed.raw, message.signature, key.address),
            f"the enclave-signed transaction recovers its address {enclave_sender}",
        ]
        result = {
            "home": str(home),
            "key": key.to_dict(),
            "transaction": tx,
            "signed_transaction": signed.to_dict(),
            "message": DEMO_MESSAGE,
            "message_signature": message.to_dict(),
            "enclave_key": enclave_key.to_dict(),
            "enclave_signed_transaction": enclave_signed.to_dict(),
            "checks": checks,
        }

    def human() -> None:
        stdout.print(f"[bold]1.[/bold] throwaway home {result['home']} with a new keystore")
        stdout.print(f"[bold]2.[/bold] new address {key.address} (key id {key.key_id})")
        stdout.print(
            f"[bold]3.[/bold] signed an EIP-1559 transfer: hash {signed.to_dict()['hash']}"
        )
        stdout.print(f"   raw {signed.to_dict()['raw_transaction']}")
        stdout.print(f"[bold]4.[/bold] signed the message {DEMO_MESSAGE!r}")
        stdout.print(f"   signature {message.to_dict()['signature']}")
        stdout.print(
            f"[bold]5.[/bold] started a local enclave process; its new address"
            f" {enclave_key.address} (key sealed under a KMS data key) signed the same transfer"
        )
        stdout.print("[bold]6.[/bold] verified:")
        for line in checks:
            stdout.print(f"   [green]✓[/green] {line}")
        stdout.print("the throwaway home is deleted; run `signd --help` for more")

    emit(result, as_json=as_json, human=human)
