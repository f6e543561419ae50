"""HSM custody: secp256k1 keys generated and kept inside a PKCS#11 token.

The private key is created on the token as sensitive and non-extractable and never leaves
it; the token signs 32-byte digests with raw ``CKM_ECDSA`` and the base class normalises the
r‖s it returns (low-S, recovery id checked against the stored public key). What signd knows
about a key — id, chain, address, public key, the object's CKA_ID and CKA_LABEL — lives in the
:class:`~signd.storage.base.MetadataStore` passed in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from signd.crypto.secp256k1 import RecoverableSignature
from signd.custody.base import (
    AddressDeriver,
    KeyInfo,
    check_labels,
    new_key_id,
    utc_now,
)
from signd.custody.hsm.records import DETAIL_CKA_ID, DETAIL_LABEL, cka_id_of, token_key_details
from signd.custody.hsm.settings import HsmSettings
from signd.custody.hsm.token import (
    SECP256K1_EC_PARAMS,
    HsmToken,
    TokenKey,
    decode_ec_point,
)
from signd.custody.metadata import MetadataBackedBackend, info_from_record
from signd.errors import InvalidField, KeyExists, KeyNotFound
from signd.storage.base import KeyRecord, MetadataStore

__all__ = [
    "DETAIL_CKA_ID",
    "DETAIL_LABEL",
    "SECP256K1_EC_PARAMS",
    "HsmBackend",
    "TokenKey",
    "cka_id_of",
    "decode_ec_point",
    "token_key_details",
]


class HsmBackend(MetadataBackedBackend):
    """Keys in a PKCS#11 token (AWS CloudHSM, SoftHSM2, ...), signing through a session pool."""

    custody_type = "hsm"

    def __init__(
        self,
        settings: HsmSettings,
        metadata: MetadataStore,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Load the module and log in now: a wrong module, token or PIN fails here."""
        super().__init__(metadata)
        self._token = HsmToken(settings, clock=clock)

    def __repr__(self) -> str:
        return f"HsmBackend({self._token!r})"

    def create_keys(
        self,
        chain: str,
        address_of: AddressDeriver,
        count: int = 1,
        labels: Sequence[str] = (),
        progress: Callable[[int], None] | None = None,
    ) -> list[KeyInfo]:
        """Generate ``count`` key pairs on the token and record each one as it is made.

        Running out of token memory raises CapacityExceeded; the keys made before stay.
        """
        if not isinstance(count, int) or count < 1:
            raise InvalidField("count must be a positive integer", field="count")
        labels = check_labels(labels)
        created: list[KeyInfo] = []
        for _ in range(count):
            key_id = new_key_id()
            made = self._token.generate_key(key_id)
            record = KeyRecord(
                key_id=key_id,
                chain=chain,
                address=address_of(made.public_key),
                public_key=made.public_key,
                custody=self.custody_type,
                created_at=utc_now(),
                labels=labels,
                details=token_key_details(made.cka_id, made.label),
            )
            self._metadata.add([record])
            created.append(info_from_record(record))
            if progress is not None:
                progress(len(created))
        return created

    def _sign_digest(self, key: KeyInfo, digest: bytes) -> bytes | RecoverableSignature:
        return self._token.sign(cka_id_of(key), digest)

    def list_token_keys(self) -> list[TokenKey]:
        """The token's EC secp256k1 private keys that have a CKA_ID and a public key object."""
        return self._token.list_keys()

    def adopt_keys(
        self,
        chain: str,
        address_of: AddressDeriver,
        *,
        label: str | None = None,
        key_id_attr: bytes | str | None = None,
        labels: Sequence[str] = (),
    ) -> list[KeyInfo]:
        """Record keys made outside signd, chosen by CKA_LABEL and/or CKA_ID (bytes or hex).

        No match raises KeyNotFound; a key signd already holds for this chain raises KeyExists.
        """
        if label is None and key_id_attr is None:
            raise InvalidField("give a CKA_LABEL or a CKA_ID to adopt", field="label")
        wanted_id = _parse_cka_id(key_id_attr) if key_id_attr is not None else None
        labels = check_labels(labels)
        matches = [
            key
            for key in self.list_token_keys()
            if (label is None or key.label == label)
            and (wanted_id is None or key.cka_id == wanted_id)
        ]
        if not matches:
            raise KeyNotFound("no secp256k1 private key on the HSM token matches")
        records = []
        for key in matches:
            address = address_of(key.public_key)
            if self._metadata.find(address) is not None:
                raise KeyExists(
                    f"the HSM key with CKA_ID {key.cka_id.hex()} is already held as {address}"
                )
            records.append(
                KeyRecord(
                    key_id=new_key_id(),
                    chain=chain,
                    address=address,
                    public_key=key.public_key,
                    custody=self.custody_type,
                    created_at=utc_now(),
                    labels=labels,
                    details=token_key_details(key.cka_id, key.label),
                )
            )
        self._metadata.add(records)
        return [info_from_record(record) for record in records]

    def check_health(self) -> None:
        """A token-info and session-info call on a pooled session; then the metadata store."""
        self._token.check_health()
        super().check_health()

    def close(self) -> None:
        self._token.close()
        super().close()


def _parse_cka_id(value: bytes | str) -> bytes:
    if isinstance(value, bytes):
        return value
    try:
        return bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise InvalidField("CKA_ID must be bytes or hex", field="key_id_attr") from None
