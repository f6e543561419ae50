"""The audit trail the gate writes: records sealed by the :class:`~signd.audit.AuditSigner`
and appended to the :class:`~signd.audit.AuditLog`, in the same order, under one lock."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from signd.audit import AuditLog, AuditSigner, FileAuditLog
from signd.crypto.secret import Secret
from signd.errors import SigndError

log = logging.getLogger("signd.gate.audit")

AuditEntry = dict[str, Any]
"""The keyword arguments of one :meth:`~signd.audit.AuditSigner.seal`."""

MAX_REASON = 500


class AuditTrail:
    """Seals and stores records; nothing the gate returns leaves without its record.

    :meth:`write` appends a group of records with one durable write. When the store refuses
    or fails, the error propagates (the caller withholds its results) and the signer is
    reseeded from the log's last record, so that the chain continues where the log ends.
    """

    def __init__(self, mac_key: Secret, node: str, store: AuditLog) -> None:
        self._mac_key = mac_key
        self._node = node
        self.store = store
        self._lock = threading.Lock()
        self._signer = AuditSigner(mac_key, node, last=store.last_record())

    def __repr__(self) -> str:
        return f"AuditTrail(signer={self._signer!r})"

    @property
    def signer(self) -> AuditSigner:
        return self._signer

    def close(self) -> None:
        if isinstance(self.store, FileAuditLog):
            self.store.close()

    def write(self, entries: Sequence[AuditEntry]) -> None:
        if not entries:
            return
        with self._lock:
            sealed = [
                self._signer.seal(**{**entry, "reason": str(entry["reason"])[:MAX_REASON]})
                for entry in entries
            ]
            try:
                self.store.append_many(sealed)
            except Exception as exc:
                log.error("audit log append failed; the results are withheld: %s", _why(exc))
                self._signer = AuditSigner(self._mac_key, self._node, last=self.store.last_record())
                raise


def _why(exc: Exception) -> str:
    return exc.message if isinstance(exc, SigndError) else type(exc).__name__
