"""``CiphertextForRecipient``: CMS EnvelopedData (RFC 5652) the way AWS KMS emits it.

AWS KMS answers a request with a ``Recipient`` by encrypting the plaintext to the RSA key in
the attestation document: a random AES-256-CBC content key encrypts the plaintext, and
RSAES-OAEP with SHA-256 (MGF1-SHA-256) wraps the content key. The AWS Nitro Enclaves SDK
(``aws_cms_parse_enveloped_data``, used by kmstool) walks the BER token by token and relies on
AWS's framing, so :func:`seal_for_recipient` emits the same shape::

    ContentInfo SEQUENCE (indefinite length) {
      contentType envelopedData,
      [0] EXPLICIT (indefinite) EnvelopedData SEQUENCE (indefinite) {
        version 2,
        recipientInfos SET { KeyTransRecipientInfo SEQUENCE {
          version 2, rid [0] subjectKeyIdentifier,
          keyEncryptionAlgorithm rsaesOaep(sha256, mgf1(sha256)), encryptedKey OCTET STRING } },
        encryptedContentInfo SEQUENCE (indefinite) {
          contentType data, contentEncryptionAlgorithm aes256-CBC(iv),
          encryptedContent [0] IMPLICIT OCTET STRING } } }

:func:`open_for_recipient` is the inverse, for the enclave side (:class:`signd.kms.aws.AwsKms` in
recipient mode) and for tests: it accepts definite and indefinite lengths and a primitive or
constructed ``encryptedContent``.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric import padding as asymmetric_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from signd.errors import IntegrityError

CONTENT_KEY_SIZE: Final = 32
IV_SIZE: Final = 16


_SEQUENCE: Final = 0x30
_SET: Final = 0x31
_INTEGER: Final = 0x02
_OCTET_STRING: Final = 0x04
_EOC: Final = b"\x00\x00"


def _length(size: int) -> bytes:
    if size < 0x80:
        return bytes([size])
    encoded = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(encoded)]) + encoded


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _length(len(content)) + content


def _indefinite(tag: int, *parts: bytes) -> bytes:
    return bytes([tag, 0x80]) + b"".join(parts) + _EOC


def _oid(dotted: str) -> bytes:
    """DER of an OBJECT IDENTIFIER."""
    arcs = [int(arc) for arc in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return _tlv(0x06, bytes(body))


OID_DATA: Final = _oid("1.2.840.113549.1.7.1")
OID_ENVELOPED_DATA: Final = _oid("1.2.840.113549.1.7.3")
OID_RSAES_OAEP: Final = _oid("1.2.840.113549.1.1.7")
OID_MGF1: Final = _oid("1.2.840.113549.1.1.8")
OID_SHA256: Final = _oid("2.16.840.1.101.3.4.2.1")
OID_AES256_CBC: Final = _oid("2.16.840.1.101.3.4.1.42")


def _oaep_sha256() -> asymmetric_padding.OAEP:
    return asymmetric_padding.OAEP(
        mgf=asymmetric_padding.MGF1(algorithm=hashes.SHA256()),
        algorithm=hashes.SHA256(),
        label=None,
    )


_SHA256_ALGORITHM: Final = _tlv(_SEQUENCE, OID_SHA256)
_RSAES_OAEP_SHA256: Final = _tlv(
    _SEQUENCE,
    OID_RSAES_OAEP
    + _tlv(
        _SEQUENCE,
        _tlv(0xA0, _SHA256_ALGORITHM) + _tlv(0xA1, _tlv(_SEQUENCE, OID_MGF1 + _SHA256_ALGORITHM)),
    ),
)


def seal_for_recipient(plaintext: bytes, recipient: rsa.RSAPublicKey) -> bytes:
    """Encrypt ``plaintext`` to ``recipient`` as AWS KMS's ``CiphertextForRecipient``."""
    content_key = secrets.token_bytes(CONTENT_KEY_SIZE)
    iv = secrets.token_bytes(IV_SIZE)
    padder = padding.PKCS7(algorithms.AES.block_size).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(content_key), modes.CBC(iv)).encryptor()
    encrypted_content = encryptor.update(padded) + encryptor.finalize()
    encrypted_key = recipient.encrypt(content_key, _oaep_sha256())
    key_identifier = x509.SubjectKeyIdentifier.from_public_key(recipient).digest
    recipient_info = _tlv(
        _SEQUENCE,
        _tlv(_INTEGER, b"\x02")
        + _tlv(0x80, key_identifier)
        + _RSAES_OAEP_SHA256
        + _tlv(_OCTET_STRING, encrypted_key),
    )
    encrypted_content_info = _indefinite(
        _SEQUENCE,
        OID_DATA,
        _tlv(_SEQUENCE, OID_AES256_CBC + _tlv(_OCTET_STRING, iv)),
        _tlv(0x80, encrypted_content),
    )
    enveloped_data = _indefinite(
        _SEQUENCE, _tlv(_INTEGER, b"\x02"), _tlv(_SET, recipient_info), encrypted_content_info
    )
    return _indefinite(_SEQUENCE, OID_ENVELOPED_DATA, _indefinite(0xA0, enveloped_data))


@dataclass(frozen=True, slots=True)
class _Node:
    """One BER element: its identifier octet, and its content or its children."""

    tag: int
    content: bytes
    children: tuple[_Node, ...]


_MAX_DEPTH: Final = 12


def _read(data: bytes, offset: int, depth: int) -> tuple[_Node, int]:
    """Parse the element at ``offset``; return it and the offset after it."""
    if depth > _MAX_DEPTH or offset + 2 > len(data):
        raise ValueError("truncated or too deep")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise ValueError("high tag numbers are not used here")
    first = data[offset + 1]
    offset += 2
    constructed = bool(tag & 0x20)
    if first == 0x80:
        if not constructed:
            raise ValueError("indefinite length on a primitive")
        children = []
        while data[offset : offset + 2] != _EOC:
            child, offset = _read(data, offset, depth + 1)
            children.append(child)
        return _Node(tag, b"", tuple(children)), offset + 2
    if first & 0x80:
        count = first & 0x7F
        if count == 0 or count > 4 or offset + count > len(data):
            raise ValueError("bad length")
        size = int.from_bytes(data[offset : offset + count], "big")
        offset += count
    else:
        size = first
    end = offset + size
    if end > len(data):
        raise ValueError("truncated")
    content = data[offset:end]
    if not constructed:
        return _Node(tag, content, ()), end
    children = []
    position = offset
    while position < end:
        child, position = _read(data, position, depth + 1)
        children.append(child)
    if position != end:
        raise ValueError("children overrun their parent")
    return _Node(tag, content, tuple(children)), end


def _expect(node: _Node, tag: int, count: int | None = None) -> tuple[_Node, ...]:
    if node.tag != tag or (count is not None and len(node.children) < count):
        raise ValueError(f"expected tag {tag:#x}")
    return node.children


def _octets(node: _Node) -> bytes:
    """An OCTET STRING or [0] IMPLICIT one, primitive or constructed from segments."""
    if node.tag in (_OCTET_STRING, 0x80):
        return node.content
    if node.tag in (0x24, 0xA0):
        return b"".join(_octets(child) for child in node.children)
    raise ValueError("expected an octet string")


def _oid_node(node: _Node) -> bytes:
    if node.tag != 0x06:
        raise ValueError("expected an object identifier")
    return _tlv(0x06, node.content)


def open_for_recipient(ciphertext: bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    """Decrypt a ``CiphertextForRecipient`` with the recipient's private key.

    Anything malformed, encrypted to another key or tampered with raises IntegrityError.
    """
    try:
        root, end = _read(bytes(ciphertext), 0, 0)
        if end != len(ciphertext):
            raise ValueError("trailing bytes")
        content_type, wrapper = _expect(root, _SEQUENCE, 2)[:2]
        if _oid_node(content_type) != OID_ENVELOPED_DATA:
            raise ValueError("not EnvelopedData")
        (enveloped,) = _expect(wrapper, 0xA0, 1)[:1]
        version, recipient_infos, content_info = _expect(enveloped, _SEQUENCE, 3)[:3]
        if version.tag != _INTEGER or version.content != b"\x02":
            raise ValueError("unsupported EnvelopedData version")
        (recipient,) = _expect(recipient_infos, _SET, 1)[:1]
        _, _, algorithm, encrypted_key = _expect(recipient, _SEQUENCE, 4)[:4]
        if _oid_node(_expect(algorithm, _SEQUENCE, 1)[0]) != OID_RSAES_OAEP:
            raise ValueError("key transport is not RSAES-OAEP")
        data_type, content_algorithm, encrypted = _expect(content_info, _SEQUENCE, 3)[:3]
        if _oid_node(data_type) != OID_DATA:
            raise ValueError("content is not data")
        cipher_oid, iv_node = _expect(content_algorithm, _SEQUENCE, 2)[:2]
        iv = _octets(iv_node)
        if _oid_node(cipher_oid) != OID_AES256_CBC or len(iv) != IV_SIZE:
            raise ValueError("content encryption is not AES-256-CBC")
        content_key = private_key.decrypt(_octets(encrypted_key), _oaep_sha256())
        if len(content_key) != CONTENT_KEY_SIZE:
            raise ValueError("content key has the wrong size")
        decryptor = Cipher(algorithms.AES(content_key), modes.CBC(iv)).decryptor()
        padded = decryptor.update(_octets(encrypted)) + decryptor.finalize()
        unpadder = padding.PKCS7(algorithms.AES.block_size).unpadder()
        return unpadder.update(padded) + unpadder.finalize()
    except (ValueError, IndexError):
        raise IntegrityError("CiphertextForRecipient does not open with this key") from None
