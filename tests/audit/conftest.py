"""A MAC key, a clock and a chain of sealed records for the audit tests."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from signd.audit import AuditSigner, SealedAuditRecord
from signd.crypto.secret import Secret

MAC_KEY = Secret(bytes(range(32)))
OTHER_KEY = Secret(bytes(range(1, 33)))
START = 1_700_000_000.0


def ticking_clock(step: float = 0.25) -> Callable[[], float]:
    counter = itertools.count()
    return lambda: START + step * next(counter)


def seal_one(signer: AuditSigner, n: int) -> SealedAuditRecord:
    allowed = n % 3 != 0
    return signer.seal(
        operation="sign:transaction" if n % 2 else "keys:create",
        decision="allowed" if allowed else "refused",
        reason="allowed by rule hot-eth" if allowed else "rule hot-eth: value 5 exceeds max 1",
        client_id=f"client-{n % 4}",
        key_id=f"key-{n % 7}",
        chain="ethereum",
        rule="hot-eth",
        request_sha256=f"{n:064x}",
        result_sha256=f"{n + 1:064x}" if allowed else None,
    )


def build_chain(count: int = 100, signer: AuditSigner | None = None) -> list[SealedAuditRecord]:
    signer = signer or AuditSigner(MAC_KEY, "node-a", now=ticking_clock())
    return [seal_one(signer, n) for n in range(count)]


@pytest.fixture(scope="session")
def chain() -> list[SealedAuditRecord]:
    return build_chain()
