"""The signing policy, evaluated inside the enclave: deny by default.

- :class:`Policy` — the validated policy file (:meth:`Policy.from_bytes`), its rules and
  SHA-256; :class:`PolicyHolder` keeps the one in force and reloads it without a restart.
- :class:`SigningIntent` — a request in chain-neutral terms, built by the enclave from what
  it decoded.
- :class:`PolicyEngine` — :meth:`~PolicyEngine.check` gives a :class:`Decision` naming the
  rule; :meth:`~PolicyEngine.commit` records spend once the signature exists.
"""

from signd.policy.engine import Decision, PolicyEngine, SpendLedger, SpendWindowsUnavailable
from signd.policy.intent import Operation, SigningIntent
from signd.policy.model import ANY, DomainPattern, Policy, PolicyHolder, Rule

__all__ = [
    "ANY",
    "Decision",
    "DomainPattern",
    "Operation",
    "Policy",
    "PolicyEngine",
    "PolicyHolder",
    "Rule",
    "SigningIntent",
    "SpendLedger",
    "SpendWindowsUnavailable",
]
