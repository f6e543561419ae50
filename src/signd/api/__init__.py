"""The service: a REST API under ``/v1`` and Ethereum JSON-RPC, over one Signer.

:func:`create_app` builds the ASGI app; ``signd serve`` runs it with uvicorn. Routes, methods
and examples are in ``docs/API.md``.
"""

from signd.api.app import create_app
from signd.api.service import (
    ANONYMOUS,
    Principal,
    SigningGate,
    SigningKind,
    allow_anonymous_for_tests,
)
from signd.api.settings import ApiSettings

__all__ = [
    "ANONYMOUS",
    "ApiSettings",
    "Principal",
    "SigningGate",
    "SigningKind",
    "allow_anonymous_for_tests",
    "create_app",
]
