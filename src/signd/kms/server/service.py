"""The KMS operations, sans I/O: a parsed JSON request in, a JSON-ready response out.

Each operation validates its parameters (``ValidationException`` for values out of range,
``SerializationException`` for wrong JSON types), resolves the key (id, ARN, ``alias/...``),
checks the key policy for ``kms:<Operation>`` with the request's condition context, checks the
key's state and usage, and only then touches key material.

Symmetric ciphertexts (``CiphertextBlob``), version 1::

    b"SKS" | 0x01 | key id (36 ASCII bytes) | nonce (12) | AES-GCM(plaintext) + tag (16)

with the header and the canonical JSON of the encryption context as associated data, so a
changed context, a changed header or a blob from another key fails as AWS fails it.

A ``Recipient`` (GenerateDataKey, Decrypt) carries a Nitro attestation document: it is verified
against the configured roots, its PCRs become the ``kms:RecipientAttestation:*`` condition keys,
and the plaintext is answered only as ``CiphertextForRecipient`` to its RSA key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from signd.attestation import verify_attestation
from signd.crypto.secret import Secret
from signd.errors import AccessDenied, ConfigurationError, InvalidField
from signd.kms.cms import seal_for_recipient
from signd.kms.server.errors import (
    KmsApiError,
    access_denied,
    invalid_ciphertext,
    invalid_key_usage,
    not_found,
    validation,
)
from signd.kms.server.errors import (
    serialization as serialization_error,
)
from signd.kms.server.policy import (
    MAX_POLICY_SIZE,
    POLICY_NAME,
    RECIPIENT_IMAGE_SHA384,
    RECIPIENT_PCR_PREFIX,
    KeyPolicy,
    default_key_policy,
)
from signd.kms.server.sigv4 import AccessKey
from signd.kms.server.store import (
    KEY_SPEC_SECP256K1,
    KEY_SPEC_SYMMETRIC,
    MATERIAL_SIZE,
    USAGE_ENCRYPT_DECRYPT,
    USAGE_SIGN_VERIFY,
    KeyStore,
    StoredKey,
)

_MAGIC: Final = b"SKS\x01"
_KEY_ID_SIZE: Final = 36
_NONCE_SIZE: Final = 12
_TAG_SIZE: Final = 16
_HEADER_SIZE: Final = len(_MAGIC) + _KEY_ID_SIZE
MAX_PLAINTEXT: Final = 4096
MAX_CIPHERTEXT: Final = 6144
MAX_MESSAGE: Final = 4096
MAX_DATA_KEY_BYTES: Final = 1024
SIGNING_ALGORITHM: Final = "ECDSA_SHA_256"
ENCRYPTION_ALGORITHM: Final = "SYMMETRIC_DEFAULT"
KEY_ENCRYPTION_ALGORITHM: Final = "RSAES_OAEP_SHA_256"
ATTESTATION_MAX_AGE: Final = timedelta(minutes=5)
MIN_RECIPIENT_KEY_BITS: Final = 2048
_DATA_KEY_SPECS: Final = {"AES_256": 32, "AES_128": 16}
_KEY_TYPES: Final = {
    (KEY_SPEC_SYMMETRIC, USAGE_ENCRYPT_DECRYPT),
    (KEY_SPEC_SECP256K1, USAGE_SIGN_VERIFY),
}

RootsProvider = Callable[[], Sequence[x509.Certificate]]


@dataclass(frozen=True, slots=True)
class _Recipient:
    public_key: rsa.RSAPublicKey
    context: dict[str, str]


# --------------------------------------------------------------------------- parameters


def _get(body: Mapping[str, Any], name: str, kind: type, *, required: bool) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise validation(f"1 validation error detected: {name} must not be null")
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise serialization_error(f"{name} has the wrong JSON type")
    return value


def _text(
    body: Mapping[str, Any], name: str, *, required: bool = False, max_size: int = 2048
) -> str | None:
    value: str | None = _get(body, name, str, required=required)
    if value is not None and not 0 < len(value) <= max_size:
        raise validation(f"{name} must be 1 to {max_size} characters")
    return value


def _blob(
    body: Mapping[str, Any], name: str, *, required: bool = False, max_size: int
) -> bytes | None:
    value = _get(body, name, str, required=required)
    if value is None:
        return None
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise serialization_error(f"{name} is not valid base64") from None
    if not 0 < len(data) <= max_size:
        raise validation(f"{name} must be 1 to {max_size} bytes")
    return data


def _choice(body: Mapping[str, Any], name: str, allowed: Sequence[str], default: str) -> str:
    value = _text(body, name) or default
    if value not in allowed:
        raise validation(f"{name} must be one of {', '.join(allowed)}")
    return value


def _encryption_context(body: Mapping[str, Any]) -> dict[str, str]:
    context = _get(body, "EncryptionContext", dict, required=False) or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in context.items()):
        raise serialization_error("EncryptionContext must map strings to strings")
    return dict(context)


def _canonical_context(context: Mapping[str, str]) -> bytes:
    return json.dumps(dict(context), sort_keys=True, separators=(",", ":")).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --------------------------------------------------------------------------- service


class KmsService:
    """The operations of one account in one region, over a :class:`KeyStore`."""

    def __init__(
        self,
        store: KeyStore,
        *,
        region: str,
        account: str,
        attestation_roots: RootsProvider,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.region = region
        self.account = account
        self._roots = attestation_roots
        self._clock = clock
        self._operations: dict[str, Callable[[dict[str, Any], AccessKey], dict[str, Any]]] = {
            "CreateKey": self.create_key,
            "DescribeKey": self.describe_key,
            "ListKeys": self.list_keys,
            "EnableKey": self.enable_key,
            "DisableKey": self.disable_key,
            "CreateAlias": self.create_alias,
            "GetKeyPolicy": self.get_key_policy,
            "PutKeyPolicy": self.put_key_policy,
            "GenerateDataKey": self.generate_data_key,
            "Encrypt": self.encrypt,
            "Decrypt": self.decrypt,
            "GetPublicKey": self.get_public_key,
            "Sign": self.sign,
            "Verify": self.verify,
        }

    @property
    def operations(self) -> frozenset[str]:
        return frozenset(self._operations)

    def handle(self, operation: str, body: dict[str, Any], caller: AccessKey) -> dict[str, Any]:
        """Run ``operation``; client errors raise :class:`KmsApiError`."""
        handler = self._operations.get(operation)
        if handler is None:
            raise KmsApiError("UnknownOperationException", f"unknown operation {operation}")
        return handler(body, caller)

    # ----------------------------------------------------------------------- keys

    def _arn(self, key_id: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account}:key/{key_id}"

    def _resolve(self, reference: str) -> StoredKey:
        name = reference
        prefix = f"arn:aws:kms:{self.region}:{self.account}:"
        if name.startswith("arn:"):
            if not name.startswith(prefix):
                raise not_found(f"Invalid arn {reference}")
            name = name.removeprefix(prefix)
            name = name.removeprefix("key/")
        if name.startswith("alias/"):
            target = self.store.alias(name)
            if target is None:
                raise not_found(f"Alias {prefix}{name} is not found.")
            name = target
        key = self.store.get(name)
        if key is None:
            raise not_found(f"Key '{self._arn(name)}' does not exist")
        return key

    def _key(self, body: Mapping[str, Any]) -> StoredKey:
        reference = _text(body, "KeyId", required=True)
        assert reference is not None
        return self._resolve(reference)

    def _authorize(
        self,
        key: StoredKey,
        caller: AccessKey,
        operation: str,
        context: Mapping[str, str] | None = None,
    ) -> None:
        request_context = {
            "aws:PrincipalArn": caller.principal_arn,
            "kms:CallerAccount": self.account,
            **(context or {}),
        }
        if not key.policy.allows(
            caller.principal_arn, self.account, f"kms:{operation}", request_context
        ):
            raise access_denied(
                f"User: {caller.principal_arn} is not authorized to perform: kms:{operation} "
                f"on resource: {key.arn} because no resource-based policy allows the "
                f"kms:{operation} action"
            )

    @staticmethod
    def _usable(key: StoredKey, usage: str) -> None:
        if not key.enabled:
            raise KmsApiError("DisabledException", f"{key.arn} is disabled.")
        if key.key_usage != usage:
            raise invalid_key_usage(f"{key.arn} key usage is {key.key_usage}, not {usage}")

    def _metadata(self, key: StoredKey) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "AWSAccountId": self.account,
            "KeyId": key.key_id,
            "Arn": key.arn,
            "CreationDate": key.created,
            "Enabled": key.enabled,
            "Description": key.description,
            "KeyUsage": key.key_usage,
            "KeyState": "Enabled" if key.enabled else "Disabled",
            "Origin": "AWS_KMS",
            "KeyManager": "CUSTOMER",
            "CustomerMasterKeySpec": key.key_spec,
            "KeySpec": key.key_spec,
            "MultiRegion": False,
        }
        if key.key_usage == USAGE_SIGN_VERIFY:
            metadata["SigningAlgorithms"] = [SIGNING_ALGORITHM]
        else:
            metadata["EncryptionAlgorithms"] = [ENCRYPTION_ALGORITHM]
        return metadata

    def create_key(self, body: dict[str, Any], caller: AccessKey) -> dict[str, Any]:
        spec = _text(body, "KeySpec") or _text(body, "CustomerMasterKeySpec") or KEY_SPEC_SYMMETRIC
        usage = _text(body, "KeyUsage") or USAGE_ENCRYPT_DECRYPT
        if (spec, usage) not in _KEY_TYPES:
            raise validation(
                f"KeySpec {spec} with KeyUsage {usage} is not supported; use "
                f"{KEY_SPEC_SYMMETRIC}/{USAGE_ENCRYPT_DECRYPT} or "
                f"{KEY_SPEC_SECP256K1}/{USAGE_SIGN_VERIFY}"
            )
        origin = _text(body, "Origin") or "AWS_KMS"
        if origin != "AWS_KMS" or _get(body, "MultiRegion", bool, required=False):
            raise KmsApiError("UnsupportedOperationException", "only single-Region AWS_KMS keys")
        description = _get(body, "Description", str, required=False) or ""
        if len(description) > 8192:
            raise validation("Description must be at most 8192 characters")
        document = _text(body, "Policy", max_size=MAX_POLICY_SIZE) or default_key_policy(
            self.account
        )
        policy = KeyPolicy.parse(document)
        tags = _tags(body)
        key_id = self.store.new_key_id()
        if spec == KEY_SPEC_SECP256K1:
            scalar = ec.generate_private_key(ec.SECP256K1()).private_numbers().private_value
            material = scalar.to_bytes(MATERIAL_SIZE, "big")
        else:
            material = secrets.token_bytes(MATERIAL_SIZE)
        key = StoredKey(
            key_id=key_id,
            arn=self._arn(key_id),
            created=round(time.time(), 3),
            description=description,
            key_spec=spec,
            key_usage=usage,
            enabled=True,
            policy=policy,
            tags=tags,
            material=Secret(material),
        )
        self.store.put(key)
        return {"KeyMetadata": self._metadata(key)}

    def describe_key(self, body: dict[str, Any], caller: AccessKey) -> dict[str, Any]:
        key = self._key(body)
        self._authorize(key, caller, "DescribeKey")
        return {"KeyMetadata": self._metadata(key)}

    def list_keys(self, body: dict[str, Any], caller: AccessKey) -> dict[str, Any]:
        limit = _get(body, "Limit", int, required=False)
        limit = 100 if limit is None else limit
        if not 1 <= limit <= 1000:
            raise validation("Limit must be 1 to 1000")
        keys = self.store.keys()
        start = 0
        marker = _text(body, "Marker", max_size=1024)
        if marker is not None:
            ids = [key.key_id for key in keys]
            if marker not in ids:
                raise KmsApiError("InvalidMarkerException", "the marker is not valid")
            start = ids.index(marker) + 1
        page = keys[start : start + limit]
        response: dict[str, Any] = {
            "Keys": [{"KeyId": key.key_id, "KeyArn": key.arn} for key in page],
            "Truncated": start + limit < len(keys),
        }
        if response["Truncated"]:
            response["NextMarker"] = page[-1].key_id
        return response

    def enable_key(self, body: dict[str, Any], caller: AccessKey) -> dict[str, Any]:
        key = self._key(body)
        self._authorize(key, caller, "EnableKey")
        self.store.set_enabled(key, True)
        return {}

    def disable_key(self, body: dict[str, Any], caller: AccessKey) -> dict[str, Any]:
        key = self._key(body)
        self._authorize(key, caller, "DisableKey")
        self.store.set_enabled(key, False)
        return {}

    def create_alias(self, body: dict[str, Any], caller: AccessKey) -> dict[str, Any]:
        name = _text(body, "AliasName", required=True, max_size=256)
        assert name is not None
        if not name.startswith("alias/") or name.startswith("alias/aws/") or len(name) < 7:
            raise validation("AliasName must start with alias/ and not alias/aws/")
        target = _text(body, "TargetKeyId", required=True)
        assert target is not None
        key = self._resolve(target)
        self._authorize(key, caller, "CreateAlias")
        if not self.store.add_alias(name, key.key_id):
            raise KmsApiError("AlreadyExistsException", f"An alias with the name {name} exists")
        return {}

    def get_key_policy(self, body: dict[str, Any], caller: AccessKey) -> dict[str, Any]:
        key = self._key(body)
        self._authorize(key, caller, "GetKeyPolicy")
        return {"Policy": key.policy.document, "PolicyName": "default"}

    def put_key_policy(self, body: dict[str, Any], caller: AccessKey) -> dict[str, Any]:
        """Replace a key's policy, as AWS does: the current policy must allow the caller
        ``kms:PutKeyPolicy``, the new one must parse, and (unless
        ``BypassPolicyLockoutSafetyCheck``) must still allow the caller ``kms:PutKeyPolicy``."""
        name = _text(body, "PolicyName", max_size=128) or POLICY_NAME
        if name != POLICY_NAME:
            raise validation(f"PolicyName must be {POLICY_NAME}")
        document = _text(body, "Policy", required=True, max_size=MAX_POLICY_SIZE)
        assert document is not None
        bypass = _get(body, "BypassPolicyLockoutSafetyCheck", bool, required=False) or False
        key = self._key(body)
        self._authorize(key, caller, "PutKeyPolicy")
        policy = KeyPolicy.parse(document)
        request_context = {
            "aws:PrincipalArn": caller.principal_arn,
            "kms:CallerAccount": self.account,
        }
        if not bypass and not policy.allows(
            caller.principal_arn, self.account, "kms:PutKeyPolicy", request_context
        ):
            raise KmsApiError(
                "MalformedPolicyDocumentException",
                "The new key policy will not allow you to update the key policy in the future.",
            )
        self.store.set_policy(key, policy)
        return {}

    # ----------------------------------------------------------------------- recipient

    def _recipient(self, body: Mapping[str, Any]) -> _Recipient | None:
        recipient = _get(body, "Recipient", dict, required=False)
        if recipient is None:
            return None
        algorithm = _text(recipient, "KeyEncryptionAlgorithm", required=True)
        if algorithm != KEY_ENCRYPTION_ALGORITHM:
            raise validation(f"KeyEncryptionAlgorithm must be {KEY_ENCRYPTION_ALGORITHM}")
        document = _blob(
            recipient, "AttestationDocument", required=True, max_size=MAX_CIPHERTEXT * 4
        )
        assert document is not None
        try:
            attested = verify_attestation(
                document,
                root_certificates=self._roots(),
                max_age=ATTESTATION_MAX_AGE,
                now=self._clock(),
            )
        except InvalidField:
            raise validation(
                "Recipient.AttestationDocument is not a valid attestation document"
            ) from None
        except (AccessDenied, ConfigurationError) as exc:
            raise access_denied(f"the attestation document is not trusted: {exc.message}") from None
        if attested.public_key is None:
            raise validation("the attestation document carries no public key")
        try:
            public_key = serialization.load_der_public_key(attested.public_key)
        except (ValueError, UnsupportedAlgorithm):
            raise validation("the attestation document's public key is not DER SPKI") from None
        if (
            not isinstance(public_key, rsa.RSAPublicKey)
            or public_key.key_size < MIN_RECIPIENT_KEY_BITS
        ):
            raise validation("the attestation document's public key must be RSA-2048 or larger")
        context = {
            f"{RECIPIENT_PCR_PREFIX}{index}": value.hex() for index, value in attested.pcrs.items()
        }
        if 0 in attested.pcrs:
            context[RECIPIENT_IMAGE_SHA384] = attested.pcrs[0].hex()
        return _Recipient(public_key, context)

    @staticmethod
    def _answer_plaintext(
        response: dict[str, Any], plaintext: bytes, recipient: _Recipient | None
    ) -> dict[str, Any]:
        if recipient is None:
            response["Plaintext"] = _b64(plaintext)
        else:
            response["CiphertextForRecipient"] = _b64(
                seal_for_recipient(plaintext, recipient.public_key)
            )
        return response

    # ----------------------------------------------------------------------- symmetric

    def _seal(self, key: StoredKey, plaintext: bytes, context: Mapping[str, str]) -> bytes:
        header = _MAGIC + key.key_id.encode()
        nonce = secrets.token_bytes(_NONCE_SIZE)
        aead = AESGCM(key.material.reveal_bytes())
        return header + nonce + aead.encrypt(nonce, plaintext, header + _canonical_context(context))

    def _condition_context(
        self, context: Mapping[str, str], recipient: _Recipient | None
    ) -> dict[str, str]:
        keys = {f"kms:EncryptionContext:{name}": value for name, value in context.items()}
        return keys | (recipient.context if recipient is not None else {})

    def generate_data_key(self, body: dict[str, Any], caller: AccessKey) -> dict[str, Any]:
        key = self._key(body)
        spec = _text(body, "KeySpec")
        count = _get(body, "NumberOfBytes", int, required=False)
        if (spec is None) == (count is None):
            raise validation("give exactly one of KeySpec and NumberOfBytes")
        if spec is not None:
            if spec not in _DATA_KEY_SPECS:
                raise validation(f"KeySpec must be one of {', '.join(_DATA_KEY_SPECS)}")
            count = _DATA_KEY_SPECS[spec]
        assert count is not None
        if not 1 <= count <= MAX_DATA_KEY_BYTES:
            raise validation(f"NumberOfBytes must be 1 to {MAX_DATA_KEY_BYTES}")
        context = _encryption_context(body)
        recipient = self._recipient(body)
        self._authorize(key, caller, "GenerateDataKey", self._condition_context(context, recipient))
        self._usable(key, USAGE_ENCRYPT_DECRYPT)
        data_key = secrets.token_bytes(count)
        response = {"CiphertextBlob": _b64(self._seal(key, data_key, context)), "KeyId": key.arn}
        return self._answer_plaintext(response, data_key, recipient)

    def encrypt(self, body: dict[str, Any], caller: AccessKey) -> dict[str, Any]:
        key = self._key(body)
        plaintext = _blob(body, "Plaintext", required=True, max_size=MAX_PLAINTEXT)
        assert plaintext is not None
        _choice(body, "EncryptionAlgorithm", [ENCRYPTION_ALGORITHM], ENCRYPTION_ALGORITHM)
        context = _encryption_context(body)
        self._authorize(key, caller, "Encrypt", self._condition_context(context, None))
        self._usable(key, USAGE_ENCRYPT_DECRYPT)
        return {
            "CiphertextBlob": _b64(self._seal(key, plaintext, context)),
            "KeyId": key.arn,
            "EncryptionAlgorithm": ENCRYPTION_ALGORITHM,
        }

    def decrypt(self, body: dict[str, Any], caller: AccessKey) -> dict[str, Any]:
        blob = _blob(body, "CiphertextBlob", required=True, max_size=MAX_CIPHERTEXT)
        assert blob is not None
        _choice(body, "EncryptionAlgorithm", [ENCRYPTION_ALGORITHM], ENCRYPTION_ALGORITHM)
        context = _encryption_context(body)
        if len(blob) < _HEADER_SIZE + _NONCE_SIZE + _TAG_SIZE or not blob.startswith(_MAGIC):
            raise invalid_ciphertext()
        try:
            embedded = blob[len(_MAGIC) : _HEADER_SIZE].decode("ascii")
        except UnicodeDecodeError:
            raise invalid_ciphertext() from None
        reference = _text(body, "KeyId")
        if reference is not None:
            key = self._resolve(reference)
            if key.key_id != embedded:
                raise KmsApiError(
                    "IncorrectKeyException",
                    "The key ID in the request does not identify a KMS key that can perform "
                    "this operation.",
                )
        else:
            found = self.store.get(embedded)
            if found is None:
                raise invalid_ciphertext()
            key = found
        recipient = self._recipient(body)
        self._authorize(key, caller, "Decrypt", self._condition_context(context, recipient))
        self._usable(key, USAGE_ENCRYPT_DECRYPT)
        header, nonce = blob[:_HEADER_SIZE], blob[_HEADER_SIZE : _HEADER_SIZE + _NONCE_SIZE]
        try:
            plaintext = AESGCM(key.material.reveal_bytes()).decrypt(
                nonce, blob[_HEADER_SIZE + _NONCE_SIZE :], header + _canonical_context(context)
            )
        except InvalidTag:
            raise invalid_ciphertext() from None
        response = {"KeyId": key.arn, "EncryptionAlgorithm": ENCRYPTION_ALGORITHM}
        return self._answer_plaintext(response, plaintext, recipient)

    # ----------------------------------------------------------------------- asymmetric

    @staticmethod
    def _private_key(key: StoredKey) -> ec.EllipticCurvePrivateKey:
        scalar = int.from_bytes(key.material.reveal_bytes(), "big")
        return ec.derive_private_key(scalar, ec.SECP256K1())

    def get_public_key(self, body: dict[str, Any], caller: AccessKey) -> dict[str, Any]:
        key = self._key(body)
        self._authorize(key, caller, "GetPublicKey")
        if not key.enabled:
            raise KmsApiError("DisabledException", f"{key.arn} is disabled.")
        if key.key_spec != KEY_SPEC_SECP256K1:
            raise KmsApiError(
                "UnsupportedOperationException",
                f"{key.arn} is a symmetric key; it has no public key",
            )
        public = (
            self._private_key(key)
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return {
            "KeyId": key.arn,
            "PublicKey": _b64(public),
            "CustomerMasterKeySpec": key.key_spec,
            "KeySpec": key.key_spec,
            "KeyUsage": key.key_usage,
            "SigningAlgorithms": [SIGNING_ALGORITHM],
        }

    def _signing_input(self, body: Mapping[str, Any]) -> tuple[bytes, ec.ECDSA]:
        """The 32-byte SHA-256 digest to sign or verify, and the ECDSA scheme over it."""
        message = _blob(body, "Message", required=True, max_size=MAX_MESSAGE)
        assert message is not None
        message_type = _choice(body, "MessageType", ["RAW", "DIGEST"], "RAW")
        algorithm = _text(body, "SigningAlgorithm", required=True)
        if algorithm != SIGNING_ALGORITHM:
            raise invalid_key_usage(f"{algorithm} is not valid for an {KEY_SPEC_SECP256K1} key")
        if message_type == "DIGEST":
            if len(message) != hashlib.sha256().digest_size:
                raise validation("a DIGEST message for ECDSA_SHA_256 must be exactly 32 bytes")
            digest = message
        else:
            digest = hashlib.sha256(message).digest()
        return digest, ec.ECDSA(Prehashed(hashes.SHA256()))

    def sign(self, body: dict[str, Any], caller: AccessKey) -> dict[str, Any]:
        key = self._key(body)
        digest, scheme = self._signing_input(body)
        self._authorize(key, caller, "Sign")
        self._usable(key, USAGE_SIGN_VERIFY)
        signature = self._private_key(key).sign(digest, scheme)
        return {
            "KeyId": key.arn,
            "Signature": _b64(signature),
            "SigningAlgorithm": SIGNING_ALGORITHM,
        }

    def verify(self, body: dict[str, Any], caller: AccessKey) -> dict[str, Any]:
        key = self._key(body)
        digest, scheme = self._signing_input(body)
        signature = _blob(body, "Signature", required=True, max_size=MAX_CIPHERTEXT)
        assert signature is not None
        self._authorize(key, caller, "Verify")
        self._usable(key, USAGE_SIGN_VERIFY)
        try:
            self._private_key(key).public_key().verify(signature, digest, scheme)
        except (InvalidSignature, ValueError):
            raise KmsApiError(
                "KMSInvalidSignatureException", "the signature is not valid"
            ) from None
        return {"KeyId": key.arn, "SignatureValid": True, "SigningAlgorithm": SIGNING_ALGORITHM}


def _tags(body: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    tags = _get(body, "Tags", list, required=False) or []
    parsed = []
    for tag in tags:
        if not isinstance(tag, dict):
            raise serialization_error("each tag must be an object")
        name = _get(tag, "TagKey", str, required=True)
        value = _get(tag, "TagValue", str, required=True)
        if not 0 < len(name) <= 128 or len(value) > 256:
            raise KmsApiError("TagException", "tag keys are 1-128 and values 0-256 characters")
        parsed.append((name, value))
    if len(parsed) > 50:
        raise KmsApiError("TagException", "at most 50 tags")
    return tuple(parsed)
