"""A PKCS#11 token as signd uses it: generate secp256k1 keys, sign digests, list keys.

:class:`HsmToken` knows nothing of key ids, chains or metadata: it is the part of HSM custody
that must run where the PKCS#11 module runs. :class:`~signd.custody.hsm.HsmBackend` wraps it
with a metadata store on the host; inside the enclave, :mod:`signd.enclave.hsm` serves it to the
host over the enclave protocol and the host keeps the metadata.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11

from signd.crypto.secp256k1 import compress_public_key
from signd.custody.hsm.library import Pkcs11Library
from signd.custody.hsm.pool import (
    TEMPLATE_ERRORS,
    PooledSession,
    SessionPool,
    TokenFailed,
    secp256k1_unsupported,
)
from signd.custody.hsm.settings import HsmSettings
from signd.errors import CustodyUnsupported, InvalidField, SigndError

SECP256K1_EC_PARAMS = bytes.fromhex("06052b8104000a")
"""DER of the named-curve OID 1.3.132.0.10."""
CKA_ID_SIZE = 16
REQUIRED_MECHANISMS: Final = (Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA)
"""What signd asks of a token: secp256k1 key pairs, and raw ECDSA signatures with them."""

logger = logging.getLogger(__name__)


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
    """Whether ``point`` is an OCTET STRING (tag 0x04) whose length byte covers the rest,
    which is a SEC1 point's 33 or 65 bytes. A raw uncompressed point also starts with 0x04,
    and its next byte (the first of X) is 0x3F for one key in 256: read as a length it covers
    63 bytes, which no point has, so that key is not taken for a wrapped one."""
    if len(point) < 3 or point[0] != 0x04:
        return False
    header = 3 if point[1] == 0x81 else 2
    covered = point[2] if header == 3 else point[1]
    return covered == len(point) - header and covered in (33, 65)


class UnreadableEcPoint(pkcs11.PKCS11Error):
    """The token gave a key pair it just generated a CKA_EC_POINT that is no secp256k1 point
    (seen from SoftHSM2 while its token folder was being replaced): a fault of the token."""


@dataclass(frozen=True, slots=True)
class TokenKey:
    """A secp256k1 private key on the token, with its public key."""

    cka_id: bytes
    label: str
    public_key: bytes
    """Compressed SEC1."""


class HsmToken:
    """One PKCS#11 token reached through a pool of logged-in sessions."""

    def __init__(
        self, settings: HsmSettings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Load the module and log in now: a wrong module, token or PIN fails here."""
        self._settings = settings
        self._pool = SessionPool(Pkcs11Library.load(settings.module_path), settings, clock)
        self._refusals: dict[str, CustodyUnsupported] = {}
        """The token's last secp256k1 refusal of a create or a sign, until one works again:
        what :meth:`check_health` reports."""
        self._mechanisms_offered = False
        """The token was seen to offer both :data:`REQUIRED_MECHANISMS`: creates need not
        list them again (one PKCS#11 call per key, a network round trip on CloudHSM) until
        a refusal or a health check says otherwise."""
        self._pool.connect()

    def __repr__(self) -> str:
        module = str(self._settings.module_path)
        return f"HsmToken(module={module!r}, token={self._settings.token_description})"

    def generate_key(self, key_id: str) -> TokenKey:
        """A new key pair labelled ``{key_label_prefix}-{key_id}`` under a random CKA_ID.

        The private key is sensitive, never extractable and may only sign. Running out of token
        memory raises CapacityExceeded; a token that fails while it still answers, or refuses
        signd's key template, DependencyUnavailable. The template is fixed (only the CKA_ID and
        the label vary) and no caller chooses it, so a token that refuses it is in a bad state
        or cannot make secp256k1 keys: never the request's fault, nor a 500. A token that does
        not offer both CKM_EC_KEY_PAIR_GEN and CKM_ECDSA, or refuses the curve or the
        mechanism (CKR_CURVE_NOT_SUPPORTED, CKR_MECHANISM_INVALID, ...), raises
        CustodyUnsupported, and whatever it made under the new CKA_ID is destroyed.
        """
        cka_id = os.urandom(CKA_ID_SIZE)
        label = f"{self._settings.key_label_prefix}-{key_id}"
        if not self._mechanisms_offered:
            try:
                self._pool.run(self._require_mechanisms, "listing the token's mechanisms")
            except CustodyUnsupported as refused:
                self._refusals["create"] = refused
                raise
        try:
            public_key = self._pool.run(
                lambda pooled: self._generate(pooled, cka_id, label),
                "generating a secp256k1 key pair",
                token_state_errors=(
                    UnreadableEcPoint,
                    p11.ObjectHandleInvalid,  # the key pair it just made is gone
                    *TEMPLATE_ERRORS,
                ),
            )
        except TokenFailed as failed:
            raise self._generation_failed(failed) from None
        except CustodyUnsupported as refused:
            self._refusals["create"] = refused
            self._mechanisms_offered = False
            self._remove_leftovers(cka_id)
            raise
        self._refusals.pop("create", None)
        return TokenKey(cka_id, label, public_key)

    def _require_mechanisms(self, pooled: PooledSession) -> None:
        """CustodyUnsupported unless the token offers both mechanisms signd uses."""
        offered = pooled.session.token.slot.get_mechanisms()
        missing = [mechanism for mechanism in REQUIRED_MECHANISMS if mechanism not in offered]
        self._mechanisms_offered = not missing
        if missing:
            names = " and ".join(f"CKM_{mechanism.name}" for mechanism in missing)
            raise secp256k1_unsupported(
                self._pool.where, f"it does not offer {names} (C_GetMechanismList)"
            )

    def _remove_leftovers(self, cka_id: bytes) -> None:
        """Destroy what a refused generation left under its new CKA_ID: PKCS#11 makes a key
        pair all or nothing, but a module that broke that rule would leave half a pair that
        no record names."""
        try:
            removed = self._pool.run(
                lambda pooled: _destroy_objects(pooled, cka_id),
                "removing what a refused key generation left",
            )
        except SigndError as exc:
            logger.warning(
                "could not look for objects a refused key generation left under CKA_ID %s: %s",
                cka_id.hex(),
                exc.message,
            )
            return
        if removed:
            logger.warning(
                "removed %d object(s) a refused key generation left under CKA_ID %s",
                removed,
                cka_id.hex(),
            )

    def _generation_failed(self, failed: TokenFailed) -> TokenFailed:
        """A key generation the token failed twice, said with what an operator checks: a
        template refusal (which signd never varies) or a device fault is most often the
        token's storage, full or read-only, which no retry clears, and otherwise a module
        without secp256k1 that does not say so (SoftHSM2 answers CKR_GENERAL_ERROR)."""
        name = failed.error.__name__
        if issubclass(failed.error, TEMPLATE_ERRORS):
            message = (
                f"the {self._pool.where} refused signd's secp256k1 key template ({name}), which "
                "signd never varies: usually the token's state (its storage full, read-only, "
                "damaged or replaced under the module) or a module that does not support "
                "secp256k1. Retrying will not help until that is fixed: check the token's free "
                "space and that its storage is writable, then that its module makes secp256k1 "
                "keys (it still answers, so signd kept its sessions)"
            )
        else:
            message = (
                f"the {self._pool.where} failed while generating a secp256k1 key pair ({name}); "
                "it still answers, so signd kept its sessions. Retrying helps only if the fault "
                "was passing: if it recurs, check the token's storage (full or read-only), "
                "the HSM's own log, and that its module makes secp256k1 keys (some answer "
                "CKR_GENERAL_ERROR for a curve they lack)"
            )
        return TokenFailed(message, failed.error)

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
        try:
            return decode_ec_point(public[Attribute.EC_POINT])
        except InvalidField:
            raise UnreadableEcPoint() from None

    def sign(self, cka_id: bytes, digest: bytes) -> bytes:
        """Raw ``CKM_ECDSA`` over a 32-byte digest: r‖s as the token returns it (maybe high-S).

        A token that refuses the mechanism raises CustodyUnsupported."""
        try:
            signature = self._pool.run(lambda pooled: pooled.sign(cka_id, digest), "signing")
        except CustodyUnsupported as refused:
            self._refusals["sign"] = refused
            raise
        self._refusals.pop("sign", None)
        return signature

    def list_keys(self) -> list[TokenKey]:
        """The token's EC secp256k1 private keys that have a CKA_ID and a public key object."""
        return self._pool.run(_token_keys, "listing the token's keys")

    def check_health(self) -> None:
        """A token-info, session-info and mechanism-list call on a pooled session; then the
        token's last refusal of secp256k1, if no create or sign has worked since."""
        self._pool.run(self._check_token, "checking health")
        refusals = list(self._refusals.values())
        if refusals:
            raise CustodyUnsupported(refusals[0].message)

    def _check_token(self, pooled: PooledSession) -> None:
        pooled.check_token()
        self._require_mechanisms(pooled)

    def close(self) -> None:
        self._pool.close()


def _destroy_objects(pooled: PooledSession, cka_id: bytes) -> int:
    """Destroy every object with this CKA_ID; how many there were."""
    search = pooled.session.get_objects({Attribute.ID: cka_id})
    try:
        found = list(search)
    finally:
        search.close()  # C_FindObjectsFinal now, not from a __del__ in another thread
    for leftover in found:
        leftover.destroy()
    return len(found)


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
