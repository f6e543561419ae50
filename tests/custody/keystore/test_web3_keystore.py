"""Keystore v3 (Web3 Secret Storage) decryption and import.

The two documents below are the test vectors of the Web3 Secret Storage Definition
(ethereum.org, "Test vectors": password "testpassword", address 008aeeda…786b).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from eth_account import Account

from signd.crypto.secret import Secret
from signd.custody.keystore.backend import KeystoreBackend
from signd.custody.keystore.web3_keystore import decrypt_keystore_v3
from signd.errors import InvalidField, KeyExists, WrongPassphrase
from tests.custody.keystore.conftest import eth_address

SPEC_PRIVATE_KEY = "7a28b5ba57c53603b0b07b56bba752f7784bf506fa95edc395f5cf6c7514fe9d"
SPEC_ADDRESS = "008aeeda4d805471df9b2a5b0f38a0c3bcba786b"
SPEC_PASSWORD = Secret("testpassword")
SPEC_PBKDF2: dict[str, Any] = {
    "crypto": {
        "cipher": "aes-128-ctr",
        "cipherparams": {"iv": "6087dab2f9fdbbfaddc31a909735c1e6"},
        "ciphertext": "5318b4d5bcd28de64ee5559e671353e16f075ecae9f99c7a79a38af5f869aa46",
        "kdf": "pbkdf2",
        "kdfparams": {
            "c": 262144,
            "dklen": 32,
            "prf": "hmac-sha256",
            "salt": "ae3cd4e7013836a3df6bd7241b12db061dbe2c6785853cce422d148a624ce0bd",
        },
        "mac": "517ead924a9d0dc3124507e3393d175ce3ff7c1e96529c6c555ce9e51205e9b2",
    },
    "id": "3198bc9c-6672-5ab3-d995-4942343ae5b6",
    "version": 3,
}
SPEC_SCRYPT: dict[str, Any] = {
    "crypto": {
        "cipher": "aes-128-ctr",
        "cipherparams": {"iv": "83dbcc02d8ccb40e466191a123791e0e"},
        "ciphertext": "d172bf743a674da9cdad04534d56926ef8358534d458fffccd4e6ad2fbde479c",
        "kdf": "scrypt",
        "kdfparams": {
            "dklen": 32,
            "n": 262144,
            "p": 8,
            "r": 1,
            "salt": "ab0c7876052600dd703518d6fc3fe8984592145b591fc8fb5c6d43190334ba19",
        },
        "mac": "2103ac29920d71da29f15d75b4a16dbe95cfd7ff8faea1056c33131d846e3097",
    },
    "id": "3198bc9c-6672-5ab3-d995-4942343ae5b6",
    "version": 3,
}
ETH_KEY = bytes.fromhex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")


def test_spec_vector_pbkdf2() -> None:
    assert decrypt_keystore_v3(SPEC_PBKDF2, SPEC_PASSWORD).hex() == SPEC_PRIVATE_KEY


def test_spec_vector_scrypt_as_json_text(keystore: KeystoreBackend) -> None:
    info = keystore.import_keystore_json(
        "ethereum", json.dumps(SPEC_SCRYPT), SPEC_PASSWORD, eth_address
    )
    assert info.address.lower() == "0x" + SPEC_ADDRESS
    assert info.details == {"origin": "imported"}
    assert keystore.export_private_key_unsafe(info.key_id).reveal_bytes().hex() == SPEC_PRIVATE_KEY


@pytest.mark.parametrize(("kdf", "iterations"), [("scrypt", 2**10), ("pbkdf2", 1000)])
def test_files_made_by_eth_account(keystore: KeystoreBackend, kdf: str, iterations: int) -> None:
    document = Account.encrypt(ETH_KEY, "hunter2", kdf=kdf, iterations=iterations)  # type: ignore[arg-type]
    assert document["crypto"]["kdf"] == kdf
    info = keystore.import_keystore_json("ethereum", document, Secret("hunter2"), eth_address)
    assert info.address == Account.from_key(ETH_KEY).address
    assert keystore.export_private_key_unsafe(info.address).reveal_bytes() == ETH_KEY
    with pytest.raises(KeyExists):
        keystore.import_keystore_json("ethereum", document, Secret("hunter2"), eth_address)


def test_wrong_password() -> None:
    with pytest.raises(WrongPassphrase):
        decrypt_keystore_v3(SPEC_PBKDF2, Secret("testpassworD"))


_DELETE = object()


def _edited(path: tuple[str, ...], value: object) -> dict[str, Any]:
    document = copy.deepcopy(SPEC_PBKDF2)
    target = document
    for step in path[:-1]:
        target = target[step]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return document


@pytest.mark.parametrize(
    "document",
    [
        "not json",
        "[1, 2]",
        _edited(("version",), 2),
        _edited(("crypto",), _DELETE),
        _edited(("crypto", "cipher"), "aes-128-cbc"),
        _edited(("crypto", "kdf"), "argon2"),
        _edited(("crypto", "ciphertext"), "zz"),
        _edited(("crypto", "cipherparams", "iv"), "6087dab2"),
        _edited(("crypto", "mac"), 12),
        _edited(("crypto", "kdfparams", "prf"), "hmac-sha512"),
        _edited(("crypto", "kdfparams", "c"), True),
        _edited(("crypto", "kdfparams", "dklen"), 16),
        _edited(("crypto", "kdfparams", "c"), 10**9),
    ],
)
def test_malformed_documents(document: object) -> None:
    with pytest.raises(InvalidField) as excinfo:
        decrypt_keystore_v3(document, SPEC_PASSWORD)  # type: ignore[arg-type]
    assert excinfo.value.field == "document"


@pytest.mark.parametrize(("param", "value"), [("n", 1000), ("n", 2**31), ("r", 0), ("p", "8")])
def test_malformed_scrypt_parameters(param: str, value: object) -> None:
    document = copy.deepcopy(SPEC_SCRYPT)
    document["crypto"]["kdfparams"][param] = value
    with pytest.raises(InvalidField):
        decrypt_keystore_v3(document, SPEC_PASSWORD)


def test_uppercase_crypto_key_is_accepted() -> None:
    document = copy.deepcopy(SPEC_PBKDF2)
    document["Crypto"] = document.pop("crypto")
    assert decrypt_keystore_v3(document, SPEC_PASSWORD).hex() == SPEC_PRIVATE_KEY
