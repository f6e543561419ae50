"""Who is calling: registered clients, request signatures and bearer tokens.

Runs inside the enclave (the host is not trusted to authenticate callers):

- :class:`ClientsRegistry` — the validated clients file (scopes, key labels, credentials);
  :class:`ClientsHolder` keeps the one in force and reloads it without a restart.
- :func:`sign_request` — the client side of request-signature scheme v1.
- :class:`RequestVerifier` — the enclave side: signature, time window, nonce uniqueness;
  bearer tokens through :meth:`RequestVerifier.verify_bearer`.
- :class:`Principal` — the authenticated caller, with :meth:`Principal.require` (scopes) and
  :meth:`Principal.may_use` (key labels).
"""

from signd.auth.clients import (
    ALL_KEYS,
    SCOPES,
    ClientsRegistry,
    Principal,
    RegisteredClient,
    Scope,
    parse_public_key,
)
from signd.auth.reload import ClientsHolder, Reloadable
from signd.auth.request_signing import (
    HEADER_CLIENT,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    SCHEME,
    RequestVerifier,
    canonical_request,
    sign_request,
)

__all__ = [
    "ALL_KEYS",
    "HEADER_CLIENT",
    "HEADER_NONCE",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "SCHEME",
    "SCOPES",
    "ClientsHolder",
    "ClientsRegistry",
    "Principal",
    "RegisteredClient",
    "Reloadable",
    "RequestVerifier",
    "Scope",
    "canonical_request",
    "parse_public_key",
    "sign_request",
]
