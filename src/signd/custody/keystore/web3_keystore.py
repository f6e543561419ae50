"""Decrypting Ethereum keystore v3 files (the Web3 Secret Storage Definition).

KDF ``scrypt`` or ``pbkdf2`` (HMAC-SHA256), cipher AES-128-CTR under the first 16 bytes of the
derived key, MAC = keccak256(derived[16:32] ‖ ciphertext). scrypt runs through pycryptodome:
files in the wild (including the specification's own vector, n=2^18 with r=1) use parameters
that OpenSSL's RFC 7914 bound (n < 2^(16r)) refuses.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any, Final, cast

from Crypto.Protocol.KDF import scrypt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from signd.crypto.hashing import keccak256
from signd.crypto.secret import Secret
from signd.errors import InvalidField, WrongPassphrase

DERIVED_KEY_SIZE: Final = 32
MAX_SCRYPT_MEMORY: Final = 1 << 30
MAX_PBKDF2_ITERATIONS: Final = 10_000_000


def decrypt_keystore_v3(document: Mapping[str, Any] | str, password: Secret) -> bytes:
    """The private key inside a keystore v3 document.

    A wrong password is :class:`WrongPassphrase`; anything malformed is :class:`InvalidField`.
    """
    if isinstance(document, str):
        try:
            document = json.loads(document)
        except ValueError:
            raise _malformed("the document is not JSON") from None
    if not isinstance(document, Mapping):
        raise _malformed("the document is not a JSON object")
    if document.get("version") != 3:
        raise _malformed("only version 3 keystore files are supported")
    crypto = _mapping(document.get("crypto", document.get("Crypto")), "crypto")
    if crypto.get("cipher") != "aes-128-ctr":
        raise _malformed("cipher must be aes-128-ctr")
    iv = _hex(_mapping(crypto.get("cipherparams"), "cipherparams").get("iv"), "iv", 16)
    ciphertext = _hex(crypto.get("ciphertext"), "ciphertext")
    mac = _hex(crypto.get("mac"), "mac", 32)
    derived = _derive_key(
        crypto.get("kdf"), _mapping(crypto.get("kdfparams"), "kdfparams"), password
    )
    if not hmac.compare_digest(keccak256(derived[16:32] + ciphertext), mac):
        raise WrongPassphrase("the password does not open this keystore file")
    decryptor = Cipher(algorithms.AES(derived[:16]), modes.CTR(iv)).decryptor()
    private_key = decryptor.update(ciphertext) + decryptor.finalize()
    if len(private_key) != 32:
        raise _malformed("the encrypted private key is not 32 bytes")
    return private_key


def _derive_key(kdf: object, params: Mapping[str, Any], password: Secret) -> bytes:
    if _int(params.get("dklen"), "dklen", 1, 1024) != DERIVED_KEY_SIZE:
        raise _malformed("kdfparams.dklen must be 32")
    salt = _hex(params.get("salt"), "salt")
    if kdf == "scrypt":
        n = _int(params.get("n"), "n", 2, 1 << 30)
        r = _int(params.get("r"), "r", 1, 64)
        p = _int(params.get("p"), "p", 1, 64)
        if n & (n - 1) or 128 * n * r > MAX_SCRYPT_MEMORY:
            raise _malformed("scrypt n must be a power of two within the memory limit")
        # pycryptodome takes text and encodes it as latin-1: decoding so is the identity on bytes
        text, salt_text = password.reveal_bytes().decode("latin-1"), salt.decode("latin-1")
        return cast(bytes, scrypt(text, salt_text, DERIVED_KEY_SIZE, N=n, r=r, p=p))
    if kdf == "pbkdf2":
        if params.get("prf") != "hmac-sha256":
            raise _malformed("pbkdf2 prf must be hmac-sha256")
        rounds = _int(params.get("c"), "c", 1, MAX_PBKDF2_ITERATIONS)
        return hashlib.pbkdf2_hmac(
            "sha256", password.reveal_bytes(), salt, rounds, DERIVED_KEY_SIZE
        )
    raise _malformed("kdf must be scrypt or pbkdf2")


def _mapping(value: object, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _malformed(f"{name} must be an object")
    return value


def _hex(value: object, name: str, size: int | None = None) -> bytes:
    try:
        if not isinstance(value, str):
            raise ValueError
        data = bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise _malformed(f"{name} must be a hex string") from None
    if not data or (size is not None and len(data) != size):
        raise _malformed(f"{name} has the wrong length")
    return data


def _int(value: object, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _malformed(f"kdfparams.{name} must be an integer in [{low}, {high}]")
    return value


def _malformed(reason: str) -> InvalidField:
    return InvalidField(f"keystore file: {reason}", field="document")
