"""HSM custody through PKCS#11 (AWS CloudHSM in production, SoftHSM2 in tests).

Configure with :class:`HsmSettings` (``HsmSettings.from_mapping`` reads a ``[hsm]`` table and
the ``SIGND_HSM_*`` variables) and build :class:`HsmBackend` with a metadata store.
"""

from signd.custody.hsm.backend import HsmBackend, TokenKey, decode_ec_point
from signd.custody.hsm.settings import HsmSettings

__all__ = ["HsmBackend", "HsmSettings", "TokenKey", "decode_ec_point"]
