"""BIP39/BIP32/BIP44 derivation against published vectors, through the backend's own code."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import coincurve
import pytest

from signd.crypto.hashing import keccak256
from signd.crypto.secret import Secret
from signd.custody.keystore.backend import KeystoreBackend
from signd.custody.keystore.hd import (
    HDWallet,
    bip44_receive_parent,
    format_path,
    mnemonic_from_entropy,
    parse_path,
    seed_from_mnemonic,
)
from signd.errors import InvalidField
from tests.custody.keystore.conftest import open_keystore
from tests.vectors import load_vectors

BIP39 = load_vectors("bip39_english.json")["cases"]
BIP32 = load_vectors("bip32.json")["valid"]
BIP84 = load_vectors("bip44_49_84_86_derivation.json")["bip84"]
TRON = load_vectors("tron_addresses.json")["hd_derivation"]
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _path(text: str) -> tuple[int, ...]:
    return () if text == "m" else parse_path(text)


@pytest.mark.parametrize("case", BIP39, ids=lambda c: c["entropy_hex"][:16])
def test_bip39_vectors(case: dict[str, str]) -> None:
    mnemonic = mnemonic_from_entropy(bytes.fromhex(case["entropy_hex"]))
    assert mnemonic.reveal() == case["mnemonic"]
    seed = seed_from_mnemonic(mnemonic, Secret(case["passphrase"]))
    assert seed.hex() == case["seed_hex"]
    assert HDWallet(seed).node(()).PrivateKey().ToExtended() == case["bip32_root_xprv"]


@pytest.mark.parametrize("vector", BIP32, ids=lambda v: f"vector{v['vector']}")
def test_bip32_vectors(vector: dict[str, Any]) -> None:
    wallet = HDWallet(bytes.fromhex(vector["seed_hex"]))
    for chain in vector["chains"]:
        node = wallet.node(_path(chain["path"]))
        assert node.PrivateKey().ToExtended() == chain["xprv"], chain["path"]
        assert node.PublicKey().ToExtended() == chain["xpub"], chain["path"]


@pytest.mark.parametrize(
    "derivation", [d for d in BIP84["derivations"] if "pubkey" in d], ids=lambda d: d["path"]
)
def test_bip84_public_keys(derivation: dict[str, str]) -> None:
    seed = seed_from_mnemonic(Secret(BIP84["root"]["mnemonic"]))
    node = HDWallet(seed).node(parse_path(derivation["path"]))
    assert node.PublicKey().RawCompressed().ToBytes().hex() == derivation["pubkey"]


def test_bip84_through_the_backend(keystore: KeystoreBackend) -> None:
    for derivation in [d for d in BIP84["derivations"] if "pubkey" in d]:
        info = keystore.import_mnemonic(
            "bitcoin", Secret(BIP84["root"]["mnemonic"]), _hex_address, path=derivation["path"]
        )
        assert info.public_key.hex() == derivation["pubkey"]
        assert info.details["hd_path"] == derivation["path"]


def _hex_address(public_key: bytes) -> str:
    return public_key.hex()


def tron_address(public_key: bytes) -> str:
    """Base58Check(0x41 ‖ keccak256(uncompressed key)[-20:]), computed independently here."""
    uncompressed = coincurve.PublicKey(public_key).format(compressed=False)
    payload = b"\x41" + keccak256(uncompressed[1:])[-20:]
    data = payload + hashlib.sha256(hashlib.sha256(payload).digest()).digest()[:4]
    number, text = int.from_bytes(data, "big"), ""
    while number:
        number, digit = divmod(number, 58)
        text = _B58[digit] + text
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + text


@pytest.mark.parametrize("case", TRON["cases"], ids=lambda c: c["path"])
def test_tron_hd_addresses(case: dict[str, str]) -> None:
    seed = seed_from_mnemonic(Secret(TRON["mnemonic"]), Secret(TRON["passphrase"]))
    node = HDWallet(seed).node(parse_path(case["path"]))
    assert tron_address(node.PublicKey().RawCompressed().ToBytes()) == case["address"]


def test_tron_through_the_backend(keystore_path: Path) -> None:
    with open_keystore(keystore_path) as keystore:
        infos = [
            keystore.import_mnemonic(
                "tron", Secret(TRON["mnemonic"]), tron_address, path=case["path"]
            )
            for case in TRON["cases"]
        ]
    assert [i.address for i in infos] == [c["address"] for c in TRON["cases"]]
    assert len({i.details["wallet_id"] for i in infos}) == 1
    # the default path is the chain's BIP44 index 0
    with open_keystore(keystore_path.with_name("other.data")) as keystore:
        info = keystore.import_mnemonic("tron", Secret(TRON["mnemonic"]), tron_address)
    assert info.address == TRON["cases"][0]["address"]
    assert info.details["hd_path"] == "m/44'/195'/0'/0/0"


def test_bip44_parents_use_slip44_coin_types() -> None:
    assert format_path(bip44_receive_parent("ethereum")) == "m/44'/60'/0'/0"
    assert format_path(bip44_receive_parent("tron")) == "m/44'/195'/0'/0"
    assert format_path(bip44_receive_parent("bitcoin")) == "m/44'/0'/0'/0"
    with pytest.raises(InvalidField) as excinfo:
        bip44_receive_parent("dogecoin")
    assert excinfo.value.field == "chain"


@pytest.mark.parametrize("text", ["", "m", "44'/60'", "m/x", "m/44'/2147483648", "m//1"])
def test_bad_paths_are_refused(text: str) -> None:
    with pytest.raises(InvalidField) as excinfo:
        parse_path(text)
    assert excinfo.value.field == "path"


def test_path_round_trip() -> None:
    assert format_path(parse_path("m/44h/60'/0'/0/7")) == "m/44'/60'/0'/0/7"
