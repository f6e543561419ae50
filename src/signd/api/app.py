"""Assembling the service: REST and JSON-RPC on one Starlette app over one Signer."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from signd.api.downstream import Downstream
from signd.api.errors import MethodNotAllowed, RouteNotFound
from signd.api.metrics import ApiMetrics
from signd.api.middleware import (
    RefusalHeaders,
    RequestLog,
    RequestsInFlight,
    StopAtShutdown,
    rate_limited,
)
from signd.api.rest import RestApi, error_response
from signd.api.rpc import JsonRpcApi
from signd.api.service import (
    Authenticator,
    SigningGate,
    SigningService,
    allow_anonymous_for_tests,
)
from signd.api.settings import ApiSettings
from signd.errors import (
    ConfigurationError,
    DependencyUnavailable,
    InvalidRequest,
    SigndError,
)
from signd.operations import Signer
from signd.operations.attestation import EnclaveAttestor

log = logging.getLogger("signd.api")


def open_backends(signer: Signer) -> None:
    """Open every custody backend before serving, so that concurrent first requests do not
    race to open one; a backend that cannot open now is retried on use and shown by /readyz."""
    for custody in signer.custody_types:
        try:
            signer.backend(custody)
        except SigndError as exc:
            log.warning("custody %s is unavailable: %s", custody, exc.message)


def create_app(
    signer: Signer,
    settings: ApiSettings | None = None,
    *,
    authenticate: Authenticator,
    gate: SigningGate | None = None,
    attestor: EnclaveAttestor | None = None,
    downstream_transport: httpx.AsyncBaseTransport | None = None,
) -> Starlette:
    """The ASGI app. The caller owns ``signer`` (and closes it after the app has stopped).

    ``authenticate`` turns a request into a principal and every key and signing call goes
    through ``gate``: the seams for client authentication and policy. ``signd serve`` passes
    the gatekeeper's (:mod:`signd.api.gatekeeping`); unit tests of routes pass
    ``authenticate=allow_anonymous_for_tests`` and no gate (no policy at all), the only
    combination allowed without a gate. ``attestor`` serves ``GET /v1/attestation`` and adds
    the ``attestation`` part to ``/readyz`` (:func:`signd.operations.attestation.enclave_attestor`
    builds it from the configuration). ``downstream_transport`` replaces the network for
    the downstream node (tests).

    ``authenticate`` is wrapped in the request rate limits of ``settings``; the wrapped one is
    ``app.state.authenticate``, for the MQTT adapter to share them. ``app.state.requests``
    holds the HTTP requests in flight (:class:`~signd.api.middleware.RequestsInFlight`): those
    it stops are answered 503 ``dependency_unavailable``, in JSON-RPC form on its routes
    (:meth:`~signd.api.rpc.JsonRpcApi.unavailable`: with the request's id; a batch, member by
    member with HTTP 200).
    """
    if gate is None and authenticate is not allow_anonymous_for_tests:
        raise ConfigurationError("an authenticated app needs its gate (create_app(gate=...))")
    settings = settings or ApiSettings()

    def reload_counts() -> Mapping[str, int]:
        status = None if gate is None else gate.reload_status()
        return {} if status is None else status.counts

    metrics = ApiMetrics(reload_counts)
    authenticate = rate_limited(authenticate, settings)
    service = SigningService(signer, settings, metrics, gate, attestor)
    downstream = (
        Downstream(
            settings.downstream,
            timeout=settings.downstream_timeout,
            transport=downstream_transport,
        )
        if settings.downstream
        else None
    )
    rest = RestApi(service, authenticate)
    rpc = JsonRpcApi(service, authenticate, downstream)
    routes = [*rest.routes(), *rpc.routes()]
    route_names: dict[Callable[..., Any], str] = {route.endpoint: route.path for route in routes}

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            error: Exception = RouteNotFound(f"no route {request.method} {request.url.path}")
        elif exc.status_code == 405:
            error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
        else:
            error = InvalidRequest(exc.detail)
        return error_response(error, metrics, exc.headers)

    async def unexpected_error(request: Request, exc: Exception) -> Response:
        return error_response(exc, metrics)

    rpc_paths = {route.path for route in rpc.routes()}

    def stopped_at_shutdown(scope: Scope) -> Response:
        error = DependencyUnavailable(
            "signd is shutting down and stopped this request before it finished; what it"
            " asked may have been done (the audit log says): retry"
        )
        if scope["path"] in rpc_paths:
            return rpc.unavailable(scope, error)
        return error_response(error, metrics)

    requests = RequestsInFlight()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.reset()
        await service.run(open_backends, signer)
        try:
            yield
        finally:
            if downstream is not None:
                await downstream.aclose()
            service.reset()

    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(RequestLog, metrics=metrics, routes=route_names),
            Middleware(StopAtShutdown, requests=requests, refusal=stopped_at_shutdown),
            Middleware(RefusalHeaders),
        ],
        exception_handlers={HTTPException: http_error, Exception: unexpected_error},
        lifespan=lifespan,
    )
    # Starlette would answer a path with a trailing slash (``/rpc/``) with a 307 to the route
    # without it, built from the Host header: an open redirect, and a second answer for one
    # route. No route of signd ends in a slash, so such a path is an unknown route (404).
    app.router.redirect_slashes = False
    app.state.service = service
    app.state.metrics = metrics
    app.state.authenticate = authenticate
    app.state.requests = requests
    return app
