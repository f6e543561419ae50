"""The enclave's side of KMS's ``Recipient`` flow: an attested RSA key that data keys come to.

At start the enclave makes an ephemeral RSA-2048 key pair whose private half lives only in its
memory, and binds the public half into its attestation document. A KMS request that carries
``Recipient = {KeyEncryptionAlgorithm: RSAES_OAEP_SHA_256, AttestationDocument}`` is answered
with ``CiphertextForRecipient`` (CMS EnvelopedData to that RSA key) instead of ``Plaintext``,
so whatever relays the answer (the host, its proxy) only ever sees ciphertext.

**Document reuse.** A document is made on first use and reused for :data:`DOCUMENT_MAX_AGE`
(60 s), well inside the 5 minutes AWS KMS (and ``signd kms-server``) accept. Reuse is safe: the
document says nothing but "this enclave, with these PCRs, holds this RSA key"; a host that
replays it to KMS gets answers encrypted to a key it does not have. KMS does not check a nonce,
so a fresh document per call would buy nothing but an NSM round trip (and, simulated, an
ES384 signature) on every cold sign.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from signd.attestation.providers import AttestationProvider
from signd.crypto.secret import Secret
from signd.errors import ConfigurationError, IntegrityError
from signd.kms.cms import open_for_recipient

KEY_ENCRYPTION_ALGORITHM: Final = "RSAES_OAEP_SHA_256"
RSA_KEY_BITS: Final = 2048
DOCUMENT_MAX_AGE: Final = 60.0
"""Seconds an attestation document is reused before a new one is requested."""


class Recipient:
    """An attestation provider plus the ephemeral RSA key its documents carry.

    ``rsa_key`` defaults to a new RSA-2048 key (generated here, never serialised). The private
    key appears in no repr, log or error.
    """

    def __init__(
        self,
        provider: AttestationProvider,
        rsa_key: rsa.RSAPrivateKey | None = None,
        *,
        document_max_age: float = DOCUMENT_MAX_AGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rsa_key is None:
            rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
        if rsa_key.key_size < RSA_KEY_BITS:
            raise ConfigurationError(f"the recipient key must be RSA-{RSA_KEY_BITS} or larger")
        self._provider = provider
        self._rsa_key = rsa_key
        self.public_key_der = rsa_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._max_age = document_max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._document: bytes | None = None
        self._made_at = 0.0

    def __repr__(self) -> str:
        return f"Recipient(provider={type(self._provider).__name__}, rsa={self._rsa_key.key_size})"

    @property
    def provider(self) -> AttestationProvider:
        """Where the documents come from (the enclave's other attestation requests use it too)."""
        return self._provider

    def document(self) -> bytes:
        """A signed attestation document binding the public key; reused up to the max age."""
        with self._lock:
            now = self._clock()
            if self._document is None or now - self._made_at >= self._max_age:
                self._document = self._provider.attest(public_key=self.public_key_der)
                self._made_at = now
            return self._document

    def parameter(self) -> dict[str, Any]:
        """The ``Recipient`` request parameter of GenerateDataKey and Decrypt."""
        return {
            "KeyEncryptionAlgorithm": KEY_ENCRYPTION_ALGORITHM,
            "AttestationDocument": self.document(),
        }

    def open(self, ciphertext_for_recipient: bytes) -> Secret:
        """The plaintext inside a ``CiphertextForRecipient``; anything else is IntegrityError."""
        if not isinstance(ciphertext_for_recipient, bytes | bytearray) or not (
            ciphertext_for_recipient
        ):
            raise IntegrityError("KMS answered without CiphertextForRecipient")
        return Secret(open_for_recipient(bytes(ciphertext_for_recipient), self._rsa_key))
