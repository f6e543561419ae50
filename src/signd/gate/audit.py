"""The audit trail the gate writes: records sealed by the :class:`~signd.audit.AuditSigner`
and appended to the :class:`~signd.audit.AuditLog`, which writes concurrent callers'
records together and in ``seq`` order."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from signd.audit import AuditLog, AuditSigner, FileAuditLog
from signd.audit.log import store_records
from signd.crypto.secret import Secret
from signd.errors import SigndError

log = logging.getLogger("signd.gate.audit")

AuditEntry = dict[str, Any]
"""The keyword arguments of one :meth:`~signd.audit.AuditSigner.seal`."""

MAX_REASON = 500


class AuditTrail:
    """Seals and stores records; nothing the gate returns leaves without its record.

    :meth:`write` seals a group of records under a lock (so they are numbered in the order
    the decisions were made) and hands them to the store outside it, so that the store can
    write the records of concurrent callers together (group commit). When the store refuses
    or fails, the error propagates (the caller withholds its results) and the chain is
    reseeded from the log's last durable record before the next record is sealed: once the
    writes in progress have all finished, so that the log's end is final.
    """

    def __init__(self, mac_key: Secret, node: str, store: AuditLog) -> None:
        self._mac_key = mac_key
        self._node = node
        self.store = store
        self._state = threading.Condition(threading.Lock())
        self._signer = AuditSigner(mac_key, node, last=store.last_record())
        self._writing = 0
        """Writes between sealing and their store's answer."""
        self._reseed = False
        """A write failed: reseed the signer from the log once no write is in progress."""

    def __repr__(self) -> str:
        return f"AuditTrail(signer={self._signer!r})"

    @property
    def signer(self) -> AuditSigner:
        return self._signer

    def close(self) -> None:
        if isinstance(self.store, FileAuditLog):
            self.store.close()

    def write(self, entries: Sequence[AuditEntry]) -> None:
        """Seal ``entries`` and return once their records are durable, or raise; inside
        :func:`~signd.audit.log.deferring_appends`, once they are submitted."""
        if not entries:
            return
        with self._state:
            while self._reseed and self._writing:
                self._state.wait()
            if self._reseed:
                self._signer = AuditSigner(self._mac_key, self._node, last=self.store.last_record())
                self._reseed = False
            sealed = [
                self._signer.seal(**{**entry, "reason": str(entry["reason"])[:MAX_REASON]})
                for entry in entries
            ]
            self._writing += 1
        store_records(self.store, sealed, failed=self._failed, finished=self._finished)

    def _failed(self, exc: BaseException) -> None:
        why = _why(exc) if isinstance(exc, Exception) else type(exc).__name__
        log.error("audit log append failed; the results are withheld: %s", why)
        with self._state:
            self._reseed = True

    def _finished(self) -> None:
        with self._state:
            self._writing -= 1
            if not self._writing:
                self._state.notify_all()


def _why(exc: Exception) -> str:
    return exc.message if isinstance(exc, SigndError) else type(exc).__name__
