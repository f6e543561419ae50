"""Use cases: the layer that binds chain encoders to custody backends.

Chains know what to sign; custody knows how to sign a digest. Only this layer (and the
enclave, which decodes what it signs) sees both.
"""

from signd.operations.signer import Signer

__all__ = ["Signer"]
