"""The `signd` command end to end, checked against eth-account and coincurve."""

from __future__ import annotations

import json
import os
from pathlib import Path

import coincurve
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct, encode_typed_data

from tests.cli.conftest import PASSPHRASE, Cli
from tests.vectors import load_vectors

ARTICLE_TX = (
    "0xf88a8001830186a094f125691d24a6b5cdcb87a89cb825fdf4487c2a34820401a86665336436316237636436"
    "65666630333639386330333033623035366530666533313136323036652ba0d5c8eaca6a7bc128065bf7ed3fa0"
    "53863cdff64b8910f1325099eb89328877fba073fc3184cf468d163296543433c31213ebcf83b3a076a8765461"
    "e81c79b1ebc7"
)

EIP1559_TX = {
    "type": "0x2",
    "chainId": "0x1",
    "nonce": "0x5",
    "to": "0x3535353535353535353535353535353535353535",
    "value": "0xde0b6b3a7640000",
    "gas": "0x5208",
    "maxFeePerGas": "0x6fc23ac00",
    "maxPriorityFeePerGas": "0x3b9aca00",
    "data": "0x",
}


def _export(cli: Cli, ref: str) -> str:
    return cli.run("keys", "export", ref, "--unsafe-export-private-key", "--json")["private_key"]


def test_keys_new_has_documented_shape_and_right_address(cli: Cli) -> None:
    key = cli.new_key("--label", "hot")
    assert set(key) >= {"key_id", "chain", "address", "public_key", "custody", "created_at"}
    assert key["chain"] == "ethereum" and key["custody"] == "keystore"
    assert key["labels"] == ["hot"]
    assert Account.from_key(_export(cli, key["key_id"])).address == key["address"]


def test_keys_new_count_with_progress_then_list_pages(cli: Cli) -> None:
    created = cli.run("keys", "new", "--count", "150", "--json")["keys"]
    assert len({k["address"] for k in created}) == 150
    first = cli.run("keys", "list", "--limit", "100", "--json")
    second = cli.run("keys", "list", "--limit", "100", "--cursor", first["next_cursor"], "--json")
    listed = [k["key_id"] for k in first["keys"] + second["keys"]]
    assert listed == [k["key_id"] for k in created]
    assert second["next_cursor"] is None


def test_keys_show_by_id_and_by_address_in_any_case(cli: Cli) -> None:
    key = cli.new_key()
    for ref in (key["key_id"], key["address"], key["address"].lower()):
        assert cli.run("keys", "show", ref, "--json")["key_id"] == key["key_id"]


def test_sign_hash_recovers_to_the_key(cli: Cli) -> None:
    key = cli.new_key()
    digest = os.urandom(32)
    out = cli.run("sign", "hash", "--key", key["address"], "0x" + digest.hex(), "--json")
    signature = bytes.fromhex(out["signature"][2:])
    assert len(signature) == 65 and signature[64] == out["recovery_id"] in (0, 1)
    recovered = coincurve.PublicKey.from_signature_and_message(signature, digest, hasher=None)
    assert "0x" + recovered.format().hex() == key["public_key"]
    assert int(out["s"], 16) <= coincurve.utils.GROUP_ORDER_INT // 2


@pytest.mark.parametrize("via_stdin", [False, True])
def test_sign_eth_tx_is_byte_identical_to_eth_account(
    cli: Cli, tmp_path: Path, via_stdin: bool
) -> None:
    key = cli.new_key()
    if via_stdin:
        out = cli.run(
            "sign", "eth-tx", "--key", key["key_id"], "--json", input=json.dumps(EIP1559_TX)
        )
    else:
        path = tmp_path / "tx.json"
        path.write_text(json.dumps(EIP1559_TX))
        out = cli.run("sign", "eth-tx", "--key", key["key_id"], "--file", str(path), "--json")
    expected = Account.sign_transaction(EIP1559_TX, _export(cli, key["key_id"]))
    assert out["raw_transaction"] == "0x" + bytes(expected.raw_transaction).hex()
    assert out["hash"] == "0x" + bytes(expected.hash).hex()
    assert out["from"] == key["address"] == Account.recover_transaction(out["raw_transaction"])


def test_sign_eth_message_text_and_hex(cli: Cli) -> None:
    key = cli.new_key()
    text = cli.run("sign", "eth-message", "--key", key["key_id"], "--text", "hello", "--json")
    raw = cli.run("sign", "eth-message", "--key", key["key_id"], "--hex", "0x68656c6c6f", "--json")
    assert text["signature"] == raw["signature"]
    assert text["v"] in (27, 28)
    signer = Account.recover_message(encode_defunct(text="hello"), signature=text["signature"])
    assert signer == key["address"]


def test_sign_eth_typed_data_verifies_with_eth_account(cli: Cli, tmp_path: Path) -> None:
    mail = load_vectors("eth_message_signing.json")["eip712"]["spec_mail_example"]
    document = mail["typed_data"]
    path = tmp_path / "typed.json"
    path.write_text(json.dumps(document))
    key = cli.new_key()
    out = cli.run("sign", "eth-typed-data", "--key", key["key_id"], "--file", str(path), "--json")
    signable = encode_typed_data(full_message=document)
    assert Account.recover_message(signable, signature=out["signature"]) == key["address"]


def test_eth_decode_article_transaction(cli: Cli) -> None:
    out = cli.run("eth", "decode", ARTICLE_TX, "--json")
    assert out["from"] == Account.recover_transaction(ARTICLE_TX)
    assert int(out["transaction"]["chainId"], 16) == 4
    assert out["transaction"]["to"] == "0xF125691D24a6b5Cdcb87a89Cb825fdf4487c2A34"


def test_import_private_key_keystore_json_and_mnemonic(cli: Cli, tmp_path: Path) -> None:
    account = Account.create()
    key_file = tmp_path / "key.hex"
    key_file.write_text(account.key.hex())
    key_file.chmod(0o600)
    out = cli.run("keys", "import", "--private-key-file", str(key_file), "--json")
    assert out["keys"][0]["address"] == account.address

    other = Account.create()
    v3 = tmp_path / "v3.json"
    v3.write_text(json.dumps(Account.encrypt(other.key, "pw", kdf="pbkdf2", iterations=1000)))
    password = tmp_path / "pw.txt"
    password.write_text("pw")
    password.chmod(0o600)
    out = cli.run(
        "keys",
        "import",
        "--keystore-json",
        str(v3),
        "--keystore-password-file",
        str(password),
        "--json",
    )
    assert out["keys"][0]["address"] == other.address

    Account.enable_unaudited_hdwallet_features()
    _, words = Account.create_with_mnemonic()
    words_file = tmp_path / "words.txt"
    words_file.write_text(words)
    words_file.chmod(0o600)
    path = "m/44'/60'/0'/0/3"
    out = cli.run("keys", "import", "--mnemonic-file", str(words_file), "--path", path, "--json")
    assert out["keys"][0]["address"] == Account.from_mnemonic(words, account_path=path).address


def test_errors_are_json_with_codes(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    key = cli.new_key()
    bad_hash = cli.run("sign", "hash", "--key", key["key_id"], "0x1234", "--json", ok=False)
    assert bad_hash["error"]["code"] == "invalid_field"
    missing = cli.run("keys", "show", "0x" + "11" * 20, "--json", ok=False)
    assert missing["error"]["code"] == "key_not_found"
    export = cli.run("keys", "export", key["key_id"], "--json", ok=False)
    assert export["error"]["code"] == "unsupported_operation"
    monkeypatch.setenv("SIGND_KEYSTORE_PASSPHRASE", "wrong passphrase")
    wrong = cli.run("keys", "list", "--json", ok=False)
    assert wrong["error"]["code"] == "wrong_passphrase"
    monkeypatch.delenv("SIGND_KEYSTORE_PASSPHRASE")
    none = cli.run("keys", "list", "--json", ok=False)
    assert none["error"]["code"] == "configuration_error"


def test_bad_transaction_names_the_field(cli: Cli) -> None:
    key = cli.new_key()
    tx = dict(EIP1559_TX, nonce="-0x1")
    out = cli.run(
        "sign", "eth-tx", "--key", key["key_id"], "--json", input=json.dumps(tx), ok=False
    )
    assert out["error"]["field"] == "nonce"


def test_passphrase_and_private_keys_never_printed(cli: Cli) -> None:
    key = cli.new_key()
    secret = _export(cli, key["key_id"])[2:]
    outputs = [
        cli.run("keys", "list", "--json"),
        cli.run("keys", "show", key["key_id"], "--json"),
        cli.run("sign", "eth-message", "--key", key["key_id"], "--text", "x", "--json"),
    ]
    for output in outputs:
        text = json.dumps(output)
        assert PASSPHRASE not in text and secret not in text


def test_demo_runs_and_verifies(cli: Cli) -> None:
    out = cli.run("demo", "--json")
    assert out["signed_transaction"]["from"] == out["key"]["address"]
    assert any("eth-account recovers the transaction sender" in c for c in out["checks"])
    assert out["enclave_signed_transaction"]["from"] == out["enclave_key"]["address"]
    assert out["enclave_key"]["custody"] == "enclave"
    assert not Path(out["home"]).exists()
