"""The gate: every key and signing request passes it, deny by default.

- :class:`Gatekeeper` — authenticate → scope and key labels → decode what will be signed →
  policy check → sign exactly that → commit the spend → audit (refusals too).
- :class:`GateRequest` / :class:`Caller` — a request as received, and its authenticated caller.
- :class:`SigningCall`, :class:`SigningKind`, :class:`Signed` — what to sign, and the result.
- :func:`open_gatekeeper`, :class:`GatePaths`, :func:`write_dev_defaults` — files and first run.

Free of HTTP types: the API adapts requests to it, and the enclave can host it unchanged.
"""

from signd.gate.audit import AuditTrail
from signd.gate.errors import BlindSigningDisabled, OutOfScope, PolicyDenied, Unauthenticated
from signd.gate.keeper import Caller, Gatekeeper, GateRequest
from signd.gate.operations import Signed, SigningCall, SigningKind, SigningResult
from signd.gate.setup import (
    DevDefaults,
    GatePaths,
    load_mac_key,
    open_gatekeeper,
    write_dev_defaults,
)

__all__ = [
    "AuditTrail",
    "BlindSigningDisabled",
    "Caller",
    "DevDefaults",
    "GatePaths",
    "GateRequest",
    "Gatekeeper",
    "OutOfScope",
    "PolicyDenied",
    "Signed",
    "SigningCall",
    "SigningKind",
    "SigningResult",
    "Unauthenticated",
    "load_mac_key",
    "open_gatekeeper",
    "write_dev_defaults",
]
