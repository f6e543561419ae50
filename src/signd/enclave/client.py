"""The host's side of the enclave protocol: one pipelined connection, reopened when it breaks.

Many threads may call an :class:`EnclaveClient` at once; their requests share one connection
and are matched to answers by request id, so a slow KMS call inside the enclave holds up no one
else. A lost or unresponsive enclave raises :class:`signd.errors.DependencyUnavailable`; the
next call connects again, so the client recovers by itself when the enclave comes back. An
error the enclave reports arrives as the same :mod:`signd.errors` class it raised there.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Final

from signd.enclave.protocol import (
    CUSTODIES,
    CUSTODY_ENCLAVE,
    CUSTODY_VERSION,
    DEFAULT_MAX_FRAME_SIZE,
    HELLO_VERSION,
    MAX_BATCH,
    SUPPORTED_VERSIONS,
    U32_MAX,
    CreatedHsmKey,
    CreatedKey,
    Event,
    FrameDecoder,
    HsmKeyReference,
    KeyReference,
    MessageType,
    ProtocolViolation,
    Reply,
    check_attestation_nonce,
    encode_frame,
    error_from_body,
    next_request_id,
    reply_to,
    require_bytes,
    require_int,
    require_list,
)
from signd.enclave.transport import Transport, close_socket
from signd.errors import ConfigurationError, DependencyUnavailable, InvalidField, SigndError

logger = logging.getLogger(__name__)

RECV_SIZE: Final = 1 << 16
SIGNATURE_SIZE: Final = 65
"""A sealed key's signature: r‖s‖recovery id."""
HSM_SIGNATURE_SIZE: Final = 64
"""An HSM key's signature: r‖s as the token made it."""

AnyKeyReference = KeyReference | HsmKeyReference


@contextlib.contextmanager
def _parsing_answer() -> Iterator[None]:
    """A malformed answer is the enclave's fault, not the caller's: report it as unavailable."""
    try:
        yield
    except InvalidField as error:
        raise DependencyUnavailable(
            f"the enclave sent a malformed answer ({error.message})"
        ) from None


def _request_ids() -> Iterator[int]:
    """1, 2, ..., 2**32 - 1, 1, ... (0 is reserved)."""
    return itertools.cycle(range(1, U32_MAX + 1))


IDEMPOTENT_RETRIES = 2
"""A dying enclave can still accept one connection before its listener closes: retry twice."""
RETRY_PAUSE = 0.05


class ConnectionLost(DependencyUnavailable):
    """The connection to the enclave went away before the answer came (nothing was decided).

    Idempotent requests (signing, health) are retried on a new connection when this
    happens; a key creation is not, since the enclave may have created keys before it died.
    """


class _Connection:
    """One socket, a reader thread, and the requests waiting for answers on it."""

    def __init__(self, sock: socket.socket, *, max_frame_size: int, io_timeout: float) -> None:
        self._sock = sock
        self._sock.settimeout(io_timeout)
        self._max_frame_size = max_frame_size
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._pending: dict[int, tuple[MessageType, Future[dict[str, Any]]]] = {}
        self._ids = _request_ids()
        self._closed = False
        self.version = HELLO_VERSION
        self.custody: frozenset[str] = frozenset({CUSTODY_ENCLAVE})
        self.gate_only = False
        self._reader = threading.Thread(
            target=self._read_loop, name="signd-enclave-client", daemon=True
        )
        self._reader.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(
        self, message_type: MessageType, body: Mapping[str, Any]
    ) -> Future[dict[str, Any]] | None:
        """Send a request; ``None`` when the connection is already closed (nothing was sent)."""
        future: Future[dict[str, Any]] = Future()
        with self._lock:
            if self._closed:
                return None
            request_id = next_request_id(self._ids, self._pending)
            data = encode_frame(
                message_type,
                request_id,
                body,
                version=self.version,
                max_frame_size=self._max_frame_size,
            )
            self._pending[request_id] = (message_type, future)
        try:
            with self._write_lock:
                self._sock.sendall(data)
        except OSError:
            self.close(DependencyUnavailable("lost the connection to the enclave while sending"))
        return future

    def close(self, reason: SigndError | None = None) -> None:
        """Close the socket and fail every waiting request with ``reason``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending.values())
            self._pending.clear()
        close_socket(self._sock)
        message = (reason or DependencyUnavailable("the enclave connection was closed")).message
        for _, future in pending:
            future.set_exception(ConnectionLost(message))

    def _read_loop(self) -> None:
        decoder = FrameDecoder(max_frame_size=self._max_frame_size)
        while not self._closed:
            try:
                data = self._sock.recv(RECV_SIZE)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            for event in decoder.feed(data):
                if not self._dispatch(event):
                    return
        self.close(DependencyUnavailable("the enclave closed the connection"))

    def _dispatch(self, event: Event) -> bool:
        """Settle the request an event answers; False when the connection must close."""
        with self._lock:
            expected = self._pending.get(event.request_id, (None, None))[0]
        reply = reply_to(event, expected)
        if reply.broken is not None:
            if isinstance(event, ProtocolViolation):
                logger.warning("enclave sent a garbled stream: %s", event.error.message)
            self.close(DependencyUnavailable(reply.broken))
            return False
        self._settle(reply)
        return True

    def _settle(self, reply: Reply) -> None:
        """Complete the request ``reply`` answers."""
        with self._lock:
            entry = self._pending.pop(reply.request_id, None)
        if entry is None:
            logger.warning("enclave answered unknown request id %d", reply.request_id)
            return
        future = entry[1]
        if reply.error is not None:
            future.set_exception(reply.error)
        else:
            future.set_result(reply.body or {})


@dataclass(frozen=True, slots=True)
class Link:
    """What any connection to the enclave needs: its transport, how long an answer may take
    (``timeout``), how long connecting and the HELLO exchange may take, and the frame limit."""

    transport: Transport
    timeout: float = 10.0
    connect_timeout: float = 2.0
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.connect_timeout <= 0:
            raise InvalidField("timeouts must be positive", field="timeout")


class EnclaveClient:
    """Talks to the enclave over ``transport``; thread-safe, pipelined, self-healing.

    ``timeout`` bounds each request (an enclave that does not answer in time is treated as gone:
    the connection is dropped and DependencyUnavailable raised); ``connect_timeout`` bounds
    connecting and the HELLO exchange.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        timeout: float = 10.0,
        connect_timeout: float = 2.0,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        Link(transport, timeout, connect_timeout, max_frame_size)  # checks the timeouts
        self._transport = transport
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._max_frame_size = max_frame_size
        self._connection: _Connection | None = None
        self._connect_lock = threading.Lock()
        self._failed: tuple[float, str] | None = None
        """When the last connection attempt failed, and why."""
        self.max_batch = MAX_BATCH

    def __repr__(self) -> str:
        return f"EnclaveClient({self._transport!r})"

    def _connect(self) -> _Connection:
        """The open connection, or a new one. Callers that queued behind an attempt that
        failed get its error at once rather than each trying again in turn, so an enclave that
        hangs delays a request by one attempt, not by one per request waiting."""
        asked = time.monotonic()
        with self._connect_lock:
            connection = self._connection
            if connection is not None and not connection.closed:
                return connection
            if self._failed is not None and self._failed[0] >= asked:
                raise DependencyUnavailable(self._failed[1])
            try:
                self._connection = self._handshake()
            except SigndError as exc:
                self._failed = (time.monotonic(), exc.message)
                raise
            return self._connection

    def _handshake(self) -> _Connection:
        """A new connection whose HELLO exchange is done."""
        sock = self._transport.connect(self._connect_timeout)
        connection = _Connection(
            sock, max_frame_size=self._max_frame_size, io_timeout=self._timeout
        )
        try:
            future = connection.submit(MessageType.HELLO, {"versions": sorted(SUPPORTED_VERSIONS)})
            if future is None:
                raise DependencyUnavailable("the enclave closed the connection at once")
            hello = self._wait(connection, future, self._connect_timeout)
            with _parsing_answer():
                version = require_int(hello, "version", minimum=0, maximum=255)
                max_batch = require_int(hello, "max_batch", minimum=1, maximum=MAX_BATCH)
                custody = _offered_custody(hello)
                gate_only = hello.get("gate_only", False) is True
            if version not in SUPPORTED_VERSIONS:
                raise DependencyUnavailable(f"the enclave chose unknown version {version}")
        except SigndError:
            connection.close()
            raise
        connection.version = version
        connection.custody = custody if version >= CUSTODY_VERSION else custody & {CUSTODY_ENCLAVE}
        connection.gate_only = gate_only
        self.max_batch = max_batch
        return connection

    def _wait(
        self, connection: _Connection, future: Future[dict[str, Any]], timeout: float
    ) -> dict[str, Any]:
        try:
            return future.result(timeout)
        except TimeoutError:
            connection.close(DependencyUnavailable("the enclave stopped answering"))
            raise DependencyUnavailable(
                f"the enclave did not answer within {timeout:g} s"
            ) from None

    def _submit(
        self, message_type: MessageType, body: Mapping[str, Any]
    ) -> tuple[_Connection, Future[dict[str, Any]]]:
        for _ in range(2):
            connection = self._connect()
            future = connection.submit(message_type, body)
            if future is not None:
                return connection, future
        raise DependencyUnavailable("the enclave keeps closing the connection")

    @property
    def link(self) -> Link:
        """Where the enclave is and how long to wait for it, for another connection to it
        (:class:`~signd.enclave.channel.EnclaveChannel`)."""
        return Link(self._transport, self._timeout, self._connect_timeout, self._max_frame_size)

    def submit(self, message_type: MessageType, body: Mapping[str, Any]) -> Future[dict[str, Any]]:
        """Send one request without waiting; the future holds the answer's body or its error.

        Waiting on the future has no deadline of its own: pass one to ``result(timeout)``.
        """
        return self._submit(message_type, body)[1]

    def request(
        self, message_type: MessageType, body: Mapping[str, Any], *, idempotent: bool = False
    ) -> dict[str, Any]:
        """Send one request and wait for its answer (retried if idempotent and the connection
        was lost before the answer came)."""
        for attempt in range(IDEMPOTENT_RETRIES + 1):
            connection, future = self._submit(message_type, body)
            try:
                return self._wait(connection, future, self._timeout)
            except ConnectionLost:
                if not idempotent or attempt == IDEMPOTENT_RETRIES:
                    raise
            logger.info("enclave connection lost; retrying %s", message_type.name)
            time.sleep(RETRY_PAUSE * (attempt + 1))
        raise AssertionError("unreachable")

    def require_custody(self, custody: str) -> None:
        """Connect, and raise ConfigurationError unless the enclave serves ``custody``."""
        connection = self._connect()
        if custody not in connection.custody:
            raise ConfigurationError(
                f"the enclave does not hold {custody} custody (it offers "
                f"{sorted(connection.custody)} over protocol version {connection.version})"
            )

    def gate_only(self) -> bool:
        """Whether the enclave makes and uses sealed keys only through its gate (it says so
        in HELLO; an enclave that does not say is not)."""
        return self._connect().gate_only

    def health(self, custody: str = CUSTODY_ENCLAVE) -> dict[str, Any]:
        """The health of one custody in the enclave; a dependency it cannot reach raises."""
        if custody == CUSTODY_ENCLAVE:
            return self.request(MessageType.HEALTH, {}, idempotent=True)
        self.require_custody(custody)
        return self.request(MessageType.HEALTH, {"custody": custody}, idempotent=True)

    def create_keys(self, chain: str, count: int, labels: Sequence[str] = ()) -> list[CreatedKey]:
        """Have the enclave create and seal ``count`` keys (at most :attr:`max_batch`), their
        blobs binding ``labels``; each key answered names the labels its blob binds."""
        body: dict[str, Any] = {"chain": chain, "count": count}
        if labels:
            body["labels"] = list(labels)
        answer = self.request(MessageType.CREATE_KEYS, body)
        with _parsing_answer():
            items = require_list(answer, "keys", max_length=count)
            keys = [CreatedKey.from_body(item) for item in items if isinstance(item, dict)]
        if len(keys) != count:
            raise DependencyUnavailable(f"the enclave made {len(keys)} keys, not {count}")
        return keys

    def create_hsm_keys(
        self, chain: str, count: int
    ) -> tuple[list[CreatedHsmKey], SigndError | None]:
        """Have the enclave generate ``count`` keys on its HSM token.

        Keys made before a failure come back with that failure, so the caller can record them
        before raising it.
        """
        self.require_custody("hsm")
        body = {"chain": chain, "count": count, "custody": "hsm"}
        answer = self.request(MessageType.CREATE_KEYS, body)
        with _parsing_answer():
            items = require_list(answer, "keys", max_length=count)
            keys = [CreatedHsmKey.from_body(item) for item in items if isinstance(item, dict)]
            if len(keys) != len(items):
                raise InvalidField("each key must be a map", field="keys")
            error = answer.get("error")
            failure = error_from_body(error) if isinstance(error, dict) else None
        if failure is None and len(keys) != count:
            raise DependencyUnavailable(f"the enclave made {len(keys)} keys, not {count}")
        return keys, failure

    def sign_digest(self, key: AnyKeyReference, digest: bytes) -> bytes:
        """The enclave's signature over ``digest``: r‖s‖recid (sealed keys) or r‖s (HSM keys)."""
        if isinstance(key, HsmKeyReference):
            self.require_custody("hsm")
        answer = self.request(
            MessageType.SIGN_DIGEST, {**key.to_body(), "digest": digest}, idempotent=True
        )
        with _parsing_answer():
            return require_bytes(answer, "signature", size=_signature_size(key))

    def sign_digests(
        self, items: Sequence[tuple[AnyKeyReference, bytes]]
    ) -> list[bytes | SigndError]:
        """Sign many digests in one round trip; each item answers a signature or its own error."""
        if len(items) > self.max_batch:
            raise InvalidField(f"at most {self.max_batch} digests per batch", field="items")
        if any(isinstance(key, HsmKeyReference) for key, _ in items):
            self.require_custody("hsm")
        body = {"items": [{**key.to_body(), "digest": digest} for key, digest in items]}
        answer = self.request(MessageType.SIGN_DIGESTS, body, idempotent=True)
        with _parsing_answer():
            results = require_list(answer, "results", max_length=len(items))
            if len(results) != len(items):
                raise InvalidField("one result per item", field="results")
            return [
                self._sign_result(result, _signature_size(key))
                for result, (key, _) in zip(results, items, strict=True)
            ]

    @staticmethod
    def _sign_result(result: Any, size: int) -> bytes | SigndError:
        if not isinstance(result, dict):
            raise InvalidField("each result must be a map", field="results")
        if isinstance(result.get("error"), dict):
            return error_from_body(result["error"])
        return require_bytes(result, "signature", size=size)

    def flush_cache(self) -> int:
        """Make the enclave forget every unsealed key; the number forgotten."""
        answer = self.request(MessageType.FLUSH_CACHE, {}, idempotent=True)
        with _parsing_answer():
            return require_int(answer, "flushed", minimum=0, maximum=U32_MAX)

    def attestation(self, nonce: bytes) -> bytes:
        """A fresh attestation document of the enclave, binding ``nonce`` (1-64 bytes).

        Returned as the enclave sent it, unverified: check it with
        :func:`signd.attestation.verify_attestation`. An enclave that cannot attest raises
        UnsupportedOperation.
        """
        body = {"nonce": check_attestation_nonce(nonce)}
        answer = self.request(MessageType.ATTESTATION, body, idempotent=True)
        with _parsing_answer():
            document = require_bytes(answer, "document")
            if not document:
                raise InvalidField("document must not be empty", field="document")
        return document

    def close(self) -> None:
        with self._connect_lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None


def _signature_size(key: AnyKeyReference) -> int:
    return HSM_SIGNATURE_SIZE if isinstance(key, HsmKeyReference) else SIGNATURE_SIZE


def _offered_custody(hello: Mapping[str, Any]) -> frozenset[str]:
    """The custody an enclave's HELLO offers (version 1 enclaves name none: sealed keys only)."""
    offered = hello.get("custody", [CUSTODY_ENCLAVE])
    if not isinstance(offered, list) or not all(isinstance(c, str) for c in offered):
        raise InvalidField("custody must be a list of names", field="custody")
    return frozenset(offered) & frozenset(CUSTODIES)
