"""HSM custody through PKCS#11 (AWS CloudHSM in production, SoftHSM2 in tests).

Configure with :class:`HsmSettings` (``HsmSettings.from_mapping`` reads a ``[hsm]`` table and
the ``SIGND_HSM_*`` variables) and build :class:`HsmBackend` with a metadata store; or, with
``[hsm] in_enclave = true``, let ``signd enclave`` drive the :class:`HsmToken` and keep only the
metadata on the host (:mod:`signd.enclave.hsm`).

The PKCS#11 parts are imported on first use, so a host whose HSM runs in the enclave never
loads python-pkcs11.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from signd.custody.hsm.settings import HsmSettings, hsm_in_enclave

if TYPE_CHECKING:
    from signd.custody.hsm.backend import HsmBackend
    from signd.custody.hsm.token import HsmToken, TokenKey, decode_ec_point

__all__ = ["HsmBackend", "HsmSettings", "HsmToken", "TokenKey", "decode_ec_point", "hsm_in_enclave"]

_LAZY = {
    "HsmBackend": "signd.custody.hsm.backend",
    "HsmToken": "signd.custody.hsm.token",
    "TokenKey": "signd.custody.hsm.token",
    "decode_ec_point": "signd.custody.hsm.token",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
