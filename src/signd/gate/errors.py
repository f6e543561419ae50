"""The gate's refusals, each an :class:`~signd.errors.AccessDenied` with its own code::

AccessDenied
├── Unauthenticated     401: no credentials, a bad, expired or replayed request signature,
│                            or a client over its quota of requests in the time window
├── OutOfScope          403: the client lacks the scope, or may not use the key's labels
├── BlindSigningDisabled 403: raw-hash signing is switched off on this service
└── PolicyDenied        403: the policy refused; ``rule`` names the rule (None: none covers)
"""

from __future__ import annotations

from signd.errors import AccessDenied, IntegrityError, SigndError

BLIND_SIGNING_DISABLED = (
    "blind signing (raw 32-byte hashes) is disabled on this server; sign the transaction or"
    " message itself, or start signd with allow_blind_signing"
)


class Unauthenticated(AccessDenied):
    code = "unauthenticated"
    http_status = 401


class OutOfScope(AccessDenied):
    code = "out_of_scope"


class BlindSigningDisabled(AccessDenied):
    """``[api] allow_blind_signing`` is off: raw hashes are refused whoever asks and whatever
    the policy says, by the gate, which audits the refusal."""

    code = "blind_signing_disabled"

    def __init__(self, message: str = BLIND_SIGNING_DISABLED) -> None:
        super().__init__(message, field="type")


class PolicyDenied(AccessDenied):
    code = "policy_denied"

    def __init__(self, message: str, *, rule: str | None) -> None:
        super().__init__(message)
        self.rule = rule

    def to_dict(self) -> dict[str, str]:
        body = super().to_dict()
        if self.rule is not None:
            body["rule"] = self.rule
        return body


def rule_of(error: SigndError) -> str | None:
    """The policy rule a refusal names (``None`` for anything but a policy refusal)."""
    return error.rule if isinstance(error, PolicyDenied) else None


def signing_fault(error: Exception) -> IntegrityError:
    """The refusal of a call whose approved signature could not be made: a fault of the
    signing library or device that is not a :class:`~signd.errors.SigndError`. It names the
    fault's type only (its text may quote what it was given)."""
    return IntegrityError(f"signing failed ({type(error).__name__})")
