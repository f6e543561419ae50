"""HSM custody: secp256k1 keys generated and kept inside a PKCS#11 token.

The private key is created on the token as sensitive and non-extractable and never leaves
it; the token signs 32-byte digests with raw ``CKM_ECDSA`` and the base class normalises the
r‖s it returns (low-S, recovery id checked against the stored public key). What signd knows
about a key — id, chain, address, public key, the object's CKA_ID and CKA_LABEL — lives in the
:class:`~signd.storage.base.MetadataStore` passed in.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from signd.crypto.secp256k1 import RecoverableSignature, compress_public_key
from signd.custody.base import (
    AddressDeriver,
    CustodyBackend,
    KeyInfo,
    KeyPage,
    check_labels,
    new_key_id,
    utc_now,
)
from signd.custody.hsm.library import Pkcs11Library
from signd.custody.hsm.pool import PooledSession, SessionPool
from signd.custody.hsm.settings import HsmSettings
from signd.errors import IntegrityError, InvalidField, KeyExists, KeyNotFound
from signd.storage.base import KeyRecord, MetadataStore

SECP256K1_EC_PARAMS = bytes.fromhex("06052b8104000a")
"""DER of the named-curve OID 1.3.132.0.10."""
CKA_ID_SIZE = 16
DETAIL_CKA_ID = "cka_id"
DETAIL_LABEL = "cka_label"


def decode_ec_point(value: bytes) -> bytes:
    """The compressed public key from CKA_EC_POINT, DER OCTET STRING-wrapped or raw."""
    point = bytes(value)
    if len(point) in (33, 65) and point[0] in (2, 3, 4) and not _is_wrapped(point):
        return compress_public_key(point)
    if _is_wrapped(point):
        header = 3 if point[1] == 0x81 else 2
        return compress_public_key(point[header:])
    raise InvalidField("CKA_EC_POINT is neither a SEC1 point nor a DER OCTET STRING of one")


def _is_wrapped(point: bytes) -> bool:
    """Whether ``point`` is an OCTET STRING (tag 0x04) whose length byte covers the rest."""
    if len(point) < 3 or point[0] != 0x04:
        return False
    if point[1] == 0x81:
        return point[2] == len(point) - 3
    return point[1] == len(point) - 2


@dataclass(frozen=True, slots=True)
class TokenKey:
    """A secp256k1 private key found on the token, with its public key."""

    cka_id: bytes
    label: str
    public_key: bytes
    """Compressed SEC1."""


class HsmBackend(CustodyBackend):
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
        self._settings = settings
        self._metadata = metadata
        self._pool = SessionPool(Pkcs11Library.load(settings.module_path), settings, clock)
        self._pool.connect()

    def __repr__(self) -> str:
        module = str(self._settings.module_path)
        return f"HsmBackend(module={module!r}, token={self._settings.token_description})"

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
            cka_id = os.urandom(CKA_ID_SIZE)
            label = f"{self._settings.key_label_prefix}-{key_id}"
            public_key = self._pool.run(
                lambda pooled: self._generate(pooled, cka_id, label),  # noqa: B023
                "generating a secp256k1 key pair",
            )
            record = KeyRecord(
                key_id=key_id,
                chain=chain,
                address=address_of(public_key),
                public_key=public_key,
                custody=self.custody_type,
                created_at=utc_now(),
                labels=labels,
                details=((DETAIL_CKA_ID, cka_id.hex()), (DETAIL_LABEL, label)),
            )
            self._metadata.add([record])
            created.append(_info(record))
            if progress is not None:
                progress(len(created))
        return created

    @staticmethod
    def _generate(pooled: PooledSession, cka_id: bytes, label: str) -> bytes:
        public, _ = pooled.session.generate_keypair(
            KeyType.EC,
            mechanism=Mechanism.EC_KEY_PAIR_GEN,
            id=cka_id,
            label=label,
            store=True,
            capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
            public_template={Attribute.EC_PARAMS: SECP256K1_EC_PARAMS, Attribute.TOKEN: True},
            private_template={
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True,
                Attribute.DERIVE: False,
                Attribute.DECRYPT: False,
                Attribute.UNWRAP: False,
            },
        )
        return decode_ec_point(public[Attribute.EC_POINT])

    def find_key(self, ref: str) -> KeyInfo | None:
        record = self._metadata.find(ref, custody=self.custody_type)
        return None if record is None else _info(record)

    def list_keys(
        self,
        *,
        chain: str | None = None,
        label: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> KeyPage:
        page = self._metadata.list(
            custody=self.custody_type, chain=chain, label=label, cursor=cursor, limit=limit
        )
        return KeyPage([_info(record) for record in page.records], page.next_cursor)

    def _sign_digest(self, key: KeyInfo, digest: bytes) -> bytes | RecoverableSignature:
        cka_id = _cka_id_of(key)
        return self._pool.run(lambda pooled: pooled.sign(cka_id, digest), "signing")

    def list_token_keys(self) -> list[TokenKey]:
        """The token's EC secp256k1 private keys that have a CKA_ID and a public key object."""
        return self._pool.run(_token_keys, "listing the token's keys")

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
                    details=((DETAIL_CKA_ID, key.cka_id.hex()), (DETAIL_LABEL, key.label)),
                )
            )
        self._metadata.add(records)
        return [_info(record) for record in records]

    def check_health(self) -> None:
        """A token-info and session-info call on a pooled session."""
        self._pool.run(lambda pooled: pooled.check_token(), "checking health")

    def close(self) -> None:
        self._pool.close()


def _token_keys(pooled: PooledSession) -> list[TokenKey]:
    session = pooled.session
    privates = list(
        session.get_objects(
            {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType.EC}
        )
    )
    found = []
    for private in privates:
        cka_id = bytes(private[Attribute.ID])
        if not cka_id or bytes(private[Attribute.EC_PARAMS]) != SECP256K1_EC_PARAMS:
            continue
        template = {
            Attribute.CLASS: ObjectClass.PUBLIC_KEY,
            Attribute.KEY_TYPE: KeyType.EC,
            Attribute.ID: cka_id,
        }
        publics = list(session.get_objects(template))
        if len(publics) != 1:
            continue
        public_key = decode_ec_point(publics[0][Attribute.EC_POINT])
        found.append(TokenKey(cka_id, str(private[Attribute.LABEL]), public_key))
    return found


def _parse_cka_id(value: bytes | str) -> bytes:
    if isinstance(value, bytes):
        return value
    try:
        return bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise InvalidField("CKA_ID must be bytes or hex", field="key_id_attr") from None


def _cka_id_of(key: KeyInfo) -> bytes:
    try:
        return bytes.fromhex(key.details[DETAIL_CKA_ID])
    except (KeyError, ValueError):
        raise IntegrityError(f"HSM key {key.key_id} has no valid CKA_ID in its metadata") from None


def _info(record: KeyRecord) -> KeyInfo:
    return KeyInfo(
        key_id=record.key_id,
        chain=record.chain,
        address=record.address,
        public_key=record.public_key,
        custody=record.custody,
        created_at=record.created_at,
        labels=record.labels,
        details=dict(record.details),
    )
