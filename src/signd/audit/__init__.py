"""The audit trail: every key creation and signing decision, sealed in the enclave.

- :class:`AuditSigner` (enclave) numbers, MACs and chains :class:`AuditRecord` s into
  :class:`SealedAuditRecord` s.
- :class:`AuditLog` (host) stores them; :class:`FileAuditLog` as fsynced JSON lines.
- :func:`verify_chain` finds altered, removed, reordered and inserted records, and says
  which policy (:class:`PolicyRun`) the records name from which record on.
"""

from signd.audit.log import AuditLog, FileAuditLog
from signd.audit.records import (
    GENESIS,
    GENESIS_HASH,
    AuditRecord,
    AuditSigner,
    ChainHead,
    SealedAuditRecord,
)
from signd.audit.verify import (
    ChainProblem,
    PolicyRun,
    PolicyRuns,
    ProblemKind,
    VerificationReport,
    verify_chain,
)

__all__ = [
    "GENESIS",
    "GENESIS_HASH",
    "AuditLog",
    "AuditRecord",
    "AuditSigner",
    "ChainHead",
    "ChainProblem",
    "FileAuditLog",
    "PolicyRun",
    "PolicyRuns",
    "ProblemKind",
    "SealedAuditRecord",
    "VerificationReport",
    "verify_chain",
]
