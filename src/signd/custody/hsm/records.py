"""How an HSM key is named in signd's metadata: its token object's CKA_ID and CKA_LABEL.

Shared by the host-side :class:`~signd.custody.hsm.HsmBackend` and the enclave-run
:class:`~signd.custody.enclave.EnclaveHsmBackend`, so one record works with either; free of
PKCS#11 imports, since the host of an in-enclave HSM never loads the module.
"""

from __future__ import annotations

from signd.custody.base import KeyInfo
from signd.errors import IntegrityError

DETAIL_CKA_ID = "cka_id"
DETAIL_LABEL = "cka_label"


def token_key_details(cka_id: bytes, label: str) -> tuple[tuple[str, str], ...]:
    """The metadata ``details`` naming a token key: its CKA_ID (hex) and CKA_LABEL."""
    return ((DETAIL_CKA_ID, cka_id.hex()), (DETAIL_LABEL, label))


def cka_id_of(key: KeyInfo) -> bytes:
    """The CKA_ID a key's metadata names (IntegrityError when it names none)."""
    try:
        return bytes.fromhex(key.details[DETAIL_CKA_ID])
    except (KeyError, ValueError):
        raise IntegrityError(f"HSM key {key.key_id} has no valid CKA_ID in its metadata") from None
