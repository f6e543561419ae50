"""Documents altered after signing, as a host in the middle could alter them."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from signd.attestation import AttestationDocument, CoseSign1


def tamper(document: bytes, **changes: Any) -> bytes:
    """``document`` with payload fields replaced and the original signature kept."""
    envelope = CoseSign1.decode(document)
    payload = replace(AttestationDocument.decode(envelope.payload), **changes)
    return CoseSign1(envelope.protected, payload.encode(), envelope.signature).encode()
