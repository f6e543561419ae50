"""A small client for a running ``signd serve``: every request signed (scheme v1).

    from signd.client import SigndClient

    with SigndClient("http://127.0.0.1:8645", "dev", "~/.signd/dev-client.key") as client:
        key = client.create_keys(chain="ethereum", custody="keystore")[0]
        signed = client.sign_eth_transaction(key.address, {...})

The private key file is a PEM (PKCS#8) Ed25519 or P-256 key; or pass ``token=`` for a
bearer-token client. Errors come back as the :class:`~signd.errors.SigndError` subclass the
server named (``PolicyDenied`` carries the ``rule``); an unreachable server is
:class:`~signd.errors.DependencyUnavailable`, and a call that takes longer than ``timeout``
in all is :class:`~signd.errors.DeadlineExceeded` (one of them).

httpx's timeouts bound each network operation (a connect, a read, a write), so a server that
sends its answer a byte at a time could hold a call for ever (encode/httpx#1450). The client's
connections therefore go through a network backend of httpcore's whose every operation is cut
to the time the call has left.

:class:`RemoteSigner` offers the :class:`~signd.operations.Signer` methods the CLI uses, over
a client, so ``signd --url`` runs the same commands against the service.
"""

from __future__ import annotations

import base64
import functools
import json
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import quote, urlsplit

import httpcore
import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from signd import errors
from signd.attestation import AttestationDocument, aws_nitro_root_certificate, verify_attestation
from signd.auth.request_signing import PrivateKey, sign_request
from signd.chains.ethereum.transactions import SignedTransaction, decode_transaction
from signd.crypto.secp256k1 import RecoverableSignature
from signd.custody.base import CustodyBackend, KeyInfo, KeyPage
from signd.errors import (
    ConfigurationError,
    DeadlineExceeded,
    DependencyUnavailable,
    InvalidField,
    SigndError,
    UnsupportedOperation,
    shown,
)
from signd.gate import errors as gate_errors
from signd.gate.errors import PolicyDenied
from signd.operations import Signer
from signd.operations.signer import MessageSignature

MAX_KEYS_PER_REQUEST: Final = 1000
DEFAULT_TIMEOUT: Final = 60.0
"""Seconds a call may take in all, unless the client is given another ``timeout``."""
_MAX_PATH_SHOWN: Final = 80

T = TypeVar("T")


def load_request_key(path: str | Path) -> PrivateKey:
    """A request-signing private key from a PEM file (Ed25519 or P-256, unencrypted)."""
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the client key {path}: {exc.strerror}") from None
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigurationError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, PrivateKey):
        raise ConfigurationError(f"{path} is neither an Ed25519 nor a P-256 key")
    return key


def url_without_secrets(url: str) -> str:
    """``scheme://host:port`` of a URL, as messages may show it: its user info (a password),
    path and query (an API key) stay out."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _checked_url(url: str) -> str:
    """``url`` without a trailing slash, if it is an http or https URL with a host."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidField(
            "the signd URL must be http:// or https:// and a host, as in http://127.0.0.1:8645",
            field="url",
        )
    return url.rstrip("/")


@functools.cache
def _error_classes() -> dict[str, type[SigndError]]:
    """Every error class signd answers with, by code. The modules that define them are named
    here, so that the table does not depend on what else was imported; the service's modules
    are imported only when an error answer needs them, as they bring the whole server."""
    from signd.api import errors as api_errors
    from signd.api import mqtt
    from signd.operations import attestation
    from signd.policy import engine

    modules = {
        module.__name__ for module in (errors, gate_errors, api_errors, mqtt, attestation, engine)
    }
    found: dict[str, type[SigndError]] = {}
    pending: list[type[SigndError]] = [SigndError]
    while pending:
        cls = pending.pop()
        if cls.__module__ in modules:
            found.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return found


_STATUS_CODES: Final = {
    400: "invalid_request",
    401: "unauthenticated",
    403: "access_denied",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "key_exists",
    413: "payload_too_large",
    429: "rate_limited",
    502: "dependency_unavailable",
    503: "dependency_unavailable",
    504: "dependency_unavailable",
    507: "capacity_exceeded",
}
"""The error an HTTP status means when the answer carries no signd error body (a proxy's
page, say); other statuses are the root error."""
_MAX_CODE_SHOWN: Final = 64
_MAX_EXCERPT: Final = 40


def _excerpt(response: httpx.Response) -> str:
    """The start of an answer's body, quoted, for a message (never the whole body)."""
    text = response.content[:_MAX_EXCERPT].decode("utf-8", errors="replace")
    return "an empty body" if not text else f"a body starting {shown(text, _MAX_EXCERPT)}"


def _new_error(cls: type[SigndError], message: str, field: str | None) -> SigndError:
    """An instance of ``cls`` with this message and field, whatever its own constructor takes
    (``RateLimited`` takes seconds, ``RequestTimeout`` a limit: the server's message says it)."""
    error = cls.__new__(cls)
    SigndError.__init__(error, message, field=field)
    return error


def error_from(response: httpx.Response) -> SigndError:
    """The error a signd error answer names, as its class (the root error, with the code in
    its message, when the code is unknown). An answer without a signd error body is told by
    its HTTP status."""
    where = url_without_secrets(str(response.request.url))
    try:
        body = response.json()["error"]
        code, message = body["code"], body["message"]
        if not isinstance(code, str) or not isinstance(message, str):
            raise TypeError
    except (ValueError, LookupError, TypeError):
        cls = _error_classes().get(_STATUS_CODES.get(response.status_code, ""), SigndError)
        return _new_error(
            cls,
            f"signd at {where} answered HTTP {response.status_code} without a signd error,"
            f" with {_excerpt(response)}",
            None,
        )
    field = body.get("field") if isinstance(body.get("field"), str) else None
    if code == PolicyDenied.code:
        rule = body.get("rule")
        return PolicyDenied(message, rule=rule if isinstance(rule, str) else None)
    named = _error_classes().get(code)
    if named is None:
        return SigndError(f"{shown(code, _MAX_CODE_SHOWN)}: {message}", field=field)
    return _new_error(named, message, field)


def key_from_dict(data: Mapping[str, Any]) -> KeyInfo:
    """A ``KeyInfo`` from its JSON shape."""
    return KeyInfo(
        key_id=data["key_id"],
        chain=data["chain"],
        address=data["address"],
        public_key=bytes.fromhex(data["public_key"].removeprefix("0x")),
        custody=data["custody"],
        created_at=datetime.fromisoformat(data["created_at"]),
        labels=tuple(data.get("labels", ())),
        details=dict(data.get("details", {})),
    )


_CALL_ENDS: ContextVar[float | None] = ContextVar("signd_client_call_ends", default=None)
"""When (``time.monotonic()``) the running call must be over, while a call runs."""


@contextmanager
def _call_ends_at(moment: float) -> Iterator[None]:
    token = _CALL_ENDS.set(moment)
    try:
        yield
    finally:
        _CALL_ENDS.reset(token)


def _left(timeout: float | None, expired: type[httpcore.TimeoutException]) -> float | None:
    """``timeout`` for one network operation, cut to the time the running call has left;
    ``expired`` raised if it has none left."""
    ends = _CALL_ENDS.get()
    if ends is None:
        return timeout
    left = ends - time.monotonic()
    if left <= 0:
        raise expired("the call's time is up")
    return left if timeout is None else min(timeout, left)


class _BoundedStream(httpcore.NetworkStream):
    """A connection whose every read, write and TLS handshake ends when the call's time is
    up, however many bytes trickle in meanwhile."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        bounded = _left(timeout, httpcore.ConnectTimeout)
        return _BoundedStream(self._stream.start_tls(ssl_context, server_hostname, bounded))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _BoundedBackend(httpcore.NetworkBackend):
    """httpcore's own sockets, as :class:`_BoundedStream`."""

    def __init__(self) -> None:
        self._backend = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        bounded = _left(timeout, httpcore.ConnectTimeout)
        stream = self._backend.connect_tcp(host, port, bounded, local_address, socket_options)
        return _BoundedStream(stream)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        bounded = _left(timeout, httpcore.ConnectTimeout)
        return _BoundedStream(self._backend.connect_unix_socket(path, bounded, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class _BoundedTransport(httpx.HTTPTransport):
    """httpx's transport (its mapping of requests, answers and exceptions) over a connection
    pool of :class:`_BoundedBackend` connections (httpx's transport takes no network backend
    of its own), with httpx's default limits and certificates."""

    def __init__(self) -> None:
        super().__init__()
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=_BoundedBackend(),
        )


def _signature(data: Mapping[str, Any]) -> RecoverableSignature:
    return RecoverableSignature(int(data["r"], 16), int(data["s"], 16), int(data["recovery_id"]))


def _message_signature(data: Mapping[str, Any]) -> MessageSignature:
    raw = bytes.fromhex(data["signature"].removeprefix("0x"))
    recoverable = RecoverableSignature(int(data["r"], 16), int(data["s"], 16), raw[64] - 27)
    return MessageSignature(raw, recoverable)


def _keys(data: Mapping[str, Any]) -> list[KeyInfo]:
    return [key_from_dict(key) for key in _list(data["keys"])]


def _key_page(data: Mapping[str, Any]) -> KeyPage:
    cursor = data["next_cursor"]
    if cursor is not None and not isinstance(cursor, str):
        raise TypeError("next_cursor")
    return KeyPage(_keys(data), cursor)


def _transaction(data: Mapping[str, Any]) -> SignedTransaction:
    return decode_transaction(bytes.fromhex(data["raw_transaction"].removeprefix("0x")))


def _batch_results(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [_object(result) for result in _list(data["results"])]


def _readiness(data: Any) -> dict[str, Any]:
    answer = _object(data)
    if not isinstance(answer["ready"], bool):
        raise TypeError("ready")
    _list(answer["parts"])
    return answer


def _attestation_document(data: Mapping[str, Any]) -> bytes:
    return base64.b64decode(data["document"], validate=True)


def _object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise TypeError("not a JSON object")
    return data


def _list(data: Any) -> list[Any]:
    if not isinstance(data, list):
        raise TypeError("not a JSON array")
    return data


class SigndClient:
    """Signed requests to every REST route of a running ``signd serve``.

    ``timeout`` bounds each call in all: connecting, sending the request and receiving the
    whole answer (a call is never retried). The client connects directly (proxy settings in
    the environment are not used). A ``transport`` of the caller's is used as given, bounded
    only as it bounds itself.
    """

    def __init__(
        self,
        url: str,
        client_id: str | None = None,
        private_key_path: str | Path | None = None,
        *,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not timeout > 0:
            raise ConfigurationError("the client's timeout must be a positive number of seconds")
        self.timeout = timeout
        self.url = _checked_url(url)
        self.where = url_without_secrets(self.url)
        """The URL as messages show it: without user info, path or query."""
        if (private_key_path is None) == (token is None) or (
            private_key_path is not None and not client_id
        ):
            raise ConfigurationError("give a client id and its private key file, or a bearer token")
        self.client_id = client_id
        self._key = None if private_key_path is None else load_request_key(private_key_path)
        self._token = token
        self._http = httpx.Client(
            base_url=self.url,
            timeout=timeout,
            transport=transport or _BoundedTransport(),
            follow_redirects=False,  # signd never redirects: a redirect is from something else
        )

    def __repr__(self) -> str:
        return f"SigndClient(url={self.where!r}, client_id={self.client_id!r})"

    def __enter__(self) -> SigndClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, Any] | None = None,
        signed: bool = True,
    ) -> httpx.Response:
        """One request, signed over exactly the bytes and target sent; a 2xx answer, or the
        error the answer names raised (a redirect is an answer signd never gives)."""
        response = self._send(method, path, body=body, params=params, signed=signed)
        if not response.is_success:
            raise self._refusal(response)
        return response

    def _send(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, Any] | None = None,
        signed: bool = True,
    ) -> httpx.Response:
        """The answer to one request, whatever its status; a transport failure raised."""
        content = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = {"content-type": "application/json"} if body is not None else {}
        query = {name: value for name, value in (params or {}).items() if value is not None}
        request = self._http.build_request(
            method, path, content=content, params=query or None, headers=headers
        )
        if signed:
            if self._token is not None:
                request.headers["authorization"] = f"Bearer {self._token}"
            else:
                assert self._key is not None
                assert self.client_id is not None
                target = request.url.raw_path.decode("ascii")
                request.headers.update(
                    sign_request(method, target, content, self.client_id, self._key)
                )
        ends = time.monotonic() + self.timeout
        try:
            with _call_ends_at(ends):
                response = self._http.send(request)
        except httpx.HTTPError as exc:
            raise self._failure(request, exc, timed_out=time.monotonic() >= ends) from None
        return response

    def _failure(
        self, request: httpx.Request, exc: httpx.HTTPError, *, timed_out: bool
    ) -> DependencyUnavailable:
        """The error a transport failure means: the call's time was up, no whole answer
        came to a request that went out (a signing request may have been performed), or
        signd could not be reached."""
        method, path = request.method, request.url.path
        sent = isinstance(exc, httpx.ReadTimeout | httpx.RemoteProtocolError | httpx.ReadError)
        performed = " (the request was sent and may have been performed)"
        performed = performed if sent and method == "POST" else ""
        if timed_out and isinstance(exc, httpx.ConnectTimeout):
            return DeadlineExceeded(f"cannot reach signd at {self.where} within {self.timeout:g} s")
        if timed_out and isinstance(exc, httpx.TimeoutException):
            return DeadlineExceeded(
                f"signd at {self.where} did not answer {method} {path} "
                f"within {self.timeout:g} s{performed}"
            )
        if sent:
            return DependencyUnavailable(
                f"signd at {self.where} did not answer {method} {path}: "
                f"{type(exc).__name__}{performed}"
            )
        return DependencyUnavailable(f"cannot reach signd at {self.where}: {type(exc).__name__}")

    def _refusal(self, response: httpx.Response) -> SigndError:
        """The error a non-2xx answer means."""
        if response.status_code >= 400:
            return error_from(response)
        return self._unexpected(response, f"HTTP {response.status_code}, which signd never answers")

    def _unexpected(self, response: httpx.Response, what: str) -> DependencyUnavailable:
        request = response.request
        path = request.url.path
        path = path if len(path) <= _MAX_PATH_SHOWN else path[:_MAX_PATH_SHOWN] + "..."
        return DependencyUnavailable(
            f"signd at {self.where} answered {request.method} {path} with {what}:"
            " not an answer signd gives"
        )

    def _answer(self, method: str, path: str, read: Callable[[Any], T], **options: Any) -> T:
        """``read`` applied to the JSON of a 2xx answer; an answer that is not JSON, or not
        JSON ``read`` can take, is :class:`~signd.errors.DependencyUnavailable`."""
        return self._read(self.request(method, path, **options), read)

    def _read(self, response: httpx.Response, read: Callable[[Any], T]) -> T:
        try:
            answer = response.json()
        except ValueError:
            raise self._unexpected(
                response, f"HTTP {response.status_code} and {_excerpt(response)}, not JSON"
            ) from None
        try:
            return read(answer)
        except (LookupError, TypeError, ValueError, AttributeError, SigndError):
            raise self._unexpected(
                response, f"HTTP {response.status_code} and JSON without the fields expected"
            ) from None

    # keys

    def create_keys(
        self, *, chain: str, custody: str, count: int = 1, labels: Sequence[str] = ()
    ) -> list[KeyInfo]:
        body = {"chain": chain, "custody": custody, "count": count, "labels": list(labels)}
        return self._answer("POST", "/v1/keys", _keys, body=body)

    def list_keys(
        self,
        *,
        custody: str = "keystore",
        chain: str | None = None,
        label: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> KeyPage:
        params = {"custody": custody, "chain": chain, "label": label, "cursor": cursor}
        return self._answer("GET", "/v1/keys", _key_page, params=params | {"limit": limit})

    def get_key(self, ref: str) -> KeyInfo:
        """The key with this id or address; ``ref`` goes as one path segment, whatever it
        holds (``/``, ``..``, ``?`` and ``#`` included)."""
        if not ref:
            raise InvalidField("key must be a key id or an address", field="key")
        segment = quote(ref, safe="").replace(".", "%2E")  # "." and ".." are not segments
        return self._answer("GET", f"/v1/keys/{segment}", key_from_dict)

    # signatures

    def sign_hash(self, key: str, digest: bytes) -> RecoverableSignature:
        body = {"key": key, "hash": "0x" + digest.hex()}
        return self._answer("POST", "/v1/sign/hash", _signature, body=body)

    def sign_eth_transaction(self, key: str, transaction: Mapping[str, Any]) -> SignedTransaction:
        body = {"key": key, "transaction": dict(transaction)}
        return self._answer("POST", "/v1/sign/ethereum/transaction", _transaction, body=body)

    def sign_eth_message(self, key: str, message: bytes | str) -> MessageSignature:
        shown: Any = message if isinstance(message, str) else {"hex": "0x" + message.hex()}
        body = {"key": key, "message": shown}
        return self._answer("POST", "/v1/sign/ethereum/message", _message_signature, body=body)

    def sign_eth_typed_data(self, key: str, document: Mapping[str, Any]) -> MessageSignature:
        body = {"key": key, "typed_data": dict(document)}
        return self._answer("POST", "/v1/sign/ethereum/typed-data", _message_signature, body=body)

    def sign_batch(self, requests: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Batch items as JSON (``{"type", ...}``); each answer as JSON, result or error."""
        body = {"requests": list(requests)}
        return self._answer("POST", "/v1/sign/batch", _batch_results, body=body)

    # operations

    def healthz(self) -> dict[str, Any]:
        return self._answer("GET", "/healthz", _object, signed=False)

    def readyz(self) -> dict[str, Any]:
        """``{"ready", "parts"}``, ready or not (signd answers 503 when not)."""
        response = self._send("GET", "/readyz", signed=False)
        if response.status_code != HTTPStatus.SERVICE_UNAVAILABLE and not response.is_success:
            raise self._refusal(response)
        return self._read(response, _readiness)

    def metrics(self) -> str:
        return self.request("GET", "/metrics", signed=False).text

    def openapi(self) -> dict[str, Any]:
        return self._answer("GET", "/openapi.json", _object, signed=False)

    def attestation(
        self,
        nonce: bytes | None = None,
        *,
        root_certificates: Sequence[x509.Certificate] | None = None,
        expected_pcrs: Mapping[int, bytes] | None = None,
        max_age: timedelta = timedelta(minutes=5),
    ) -> AttestationDocument:
        """A fresh attestation document of the service's enclave, verified here.

        The server's own verdict is not relied on: the raw document must chain to
        ``root_certificates`` (the AWS Nitro root unless given; the development root for a
        simulated NSM), be signed, carry ``nonce`` (32 random bytes unless given), be at most
        ``max_age`` old and match ``expected_pcrs``. A failed check raises
        :class:`~signd.errors.AccessDenied` naming it.
        """
        nonce = secrets.token_bytes(32) if nonce is None else nonce
        params = {"nonce": nonce.hex()}
        document = self._answer(
            "GET", "/v1/attestation", _attestation_document, params=params, signed=False
        )
        return verify_attestation(
            document,
            root_certificates=root_certificates or [aws_nitro_root_certificate()],
            expected_pcrs=expected_pcrs,
            nonce=nonce,
            max_age=max_age,
        )


class RemoteSigner(Signer):
    """The :class:`~signd.operations.Signer` operations the CLI's key and sign commands use,
    performed by a running service. Custody is not opened here: :meth:`backend` and
    :meth:`resolve` (key import, export, HSM adoption) are refused."""

    def __init__(self, client: SigndClient) -> None:
        super().__init__({})
        self.client = client

    def backend(self, custody: str) -> CustodyBackend:
        raise UnsupportedOperation(
            f"with --url only keys new/list/show and sign go to {self.client.where}; "
            "this command needs local custody"
        )

    def resolve(self, ref: str | KeyInfo) -> tuple[CustodyBackend, KeyInfo]:
        raise self._local_only()

    def _local_only(self) -> UnsupportedOperation:
        return UnsupportedOperation(
            f"with --url only keys new/list/show and sign go to {self.client.where}"
        )

    def close(self) -> None:
        self.client.close()

    def create_keys(
        self,
        *,
        chain: str,
        custody: str,
        count: int = 1,
        labels: Sequence[str] = (),
        progress: Callable[[int], None] | None = None,
    ) -> list[KeyInfo]:
        keys: list[KeyInfo] = []
        for start in range(0, count, MAX_KEYS_PER_REQUEST):
            size = min(MAX_KEYS_PER_REQUEST, count - start)
            keys += self.client.create_keys(chain=chain, custody=custody, count=size, labels=labels)
            if progress is not None:
                progress(len(keys))
        return keys

    def get_key(self, ref: str | KeyInfo) -> KeyInfo:
        return self.client.get_key(_ref(ref))

    def list_keys(
        self,
        *,
        custody: str,
        chain: str | None = None,
        label: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> KeyPage:
        return self.client.list_keys(
            custody=custody, chain=chain, label=label, cursor=cursor, limit=limit
        )

    def sign_hash(self, ref: str | KeyInfo, digest: bytes) -> RecoverableSignature:
        return self.client.sign_hash(_ref(ref), digest)

    def sign_eth_transaction(
        self, ref: str | KeyInfo, transaction: Mapping[str, Any]
    ) -> SignedTransaction:
        return self.client.sign_eth_transaction(_ref(ref), transaction)

    def sign_eth_message(self, ref: str | KeyInfo, message: bytes) -> MessageSignature:
        return self.client.sign_eth_message(_ref(ref), message)

    def sign_eth_typed_data(
        self, ref: str | KeyInfo, document: Mapping[str, Any]
    ) -> MessageSignature:
        return self.client.sign_eth_typed_data(_ref(ref), document)


def _ref(ref: str | KeyInfo) -> str:
    if isinstance(ref, KeyInfo):
        return ref.key_id
    if not isinstance(ref, str) or not ref:
        raise InvalidField("key must be a key id or an address", field="key")
    return ref
