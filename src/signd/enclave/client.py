"""The host's side of the enclave protocol: one pipelined connection, reopened when it breaks.

Many threads may call an :class:`EnclaveClient` at once; their requests share one connection
and are matched to answers by request id, so a slow KMS call inside the enclave holds up no one
else. A lost or unresponsive enclave raises :class:`signd.errors.DependencyUnavailable`; the
next call connects again, so the client recovers by itself when the enclave comes back. An
error the enclave reports arrives as the same :mod:`signd.errors` class it raised there.

A request not answered within the timeout fails alone: it is *abandoned* (its id stays taken,
and its answer, when it comes, goes to its ``late`` handler, if any), and the connection goes
on for the others. Only an answer a second timeout late (:data:`LATE_ANSWER_TIMEOUTS`) means
the enclave has stopped answering: then the connection is dropped.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
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
    answer_frame_size,
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
LateAnswer = Callable[[dict[str, Any]], None]
"""Takes the answer to a request whose caller stopped waiting (it must not block: the
connection's reader calls it)."""
STOPPED_ANSWERING: Final = "the enclave stopped answering"
LATE_ANSWER_TIMEOUTS: Final = 2
"""An answer this many timeouts after its request was sent means the enclave has stopped
answering: the connection is dropped (failing what waits on it) and made again."""


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


@dataclass(slots=True)
class _Waiting:
    """A request sent and not yet answered."""

    message_type: MessageType
    future: Future[dict[str, Any]]
    late: LateAnswer | None = None
    drop_at: float | None = None
    """Once its caller stopped waiting: when (``time.monotonic()``) the connection is
    dropped if the answer has not come."""


def hand_late_answer(
    message_type: MessageType, late: LateAnswer | None, error: SigndError | None, body: Any
) -> None:
    """Give an answer whose caller stopped waiting to its ``late`` handler (an error answer
    carries nothing to keep); a handler's failure is logged, never raised."""
    logger.warning(
        "the enclave answered a %s request after its caller stopped waiting", message_type.name
    )
    if late is None or error is not None:
        return
    try:
        late(body or {})
    except Exception as exc:  # the connection goes on for the others
        logger.error("handling a late %s answer failed: %s", message_type.name, type(exc).__name__)


class _Connection:
    """One socket, a reader thread, and the requests waiting for answers on it."""

    def __init__(self, sock: socket.socket, *, max_frame_size: int, io_timeout: float) -> None:
        self._sock = sock
        self._sock.settimeout(io_timeout)
        self._max_frame_size = max_frame_size
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._pending: dict[int, _Waiting] = {}
        self._abandoned: deque[tuple[float, int]] = deque()
        """``(drop_at, request_id)`` of abandoned requests, in the order abandoned."""
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
        self, message_type: MessageType, body: Mapping[str, Any], late: LateAnswer | None = None
    ) -> tuple[int, Future[dict[str, Any]]] | None:
        """Send a request: its id and future; ``None`` when the connection is already closed
        (nothing was sent)."""
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
            self._pending[request_id] = _Waiting(message_type, future, late)
        try:
            with self._write_lock:
                self._sock.sendall(data)
        except OSError:
            self.close(DependencyUnavailable("lost the connection to the enclave while sending"))
        return request_id, future

    def abandon(self, request_id: int, drop_at: float) -> bool:
        """The caller of ``request_id`` stopped waiting: keep its id until the answer comes,
        and drop the connection if it has not come at ``drop_at``. False if the request is
        no longer waiting (answered just now, or the connection closed): its future is, or
        is about to be, settled."""
        with self._lock:
            entry = self._pending.get(request_id)
            if entry is None:
                return False
            if entry.drop_at is None:
                entry.drop_at = drop_at
                self._abandoned.append((drop_at, request_id))
            return True

    def close(self, reason: SigndError | None = None) -> None:
        """Close the socket and fail every waiting request with ``reason``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending.values())
            self._pending.clear()
            self._abandoned.clear()
        close_socket(self._sock)
        message = (reason or DependencyUnavailable("the enclave connection was closed")).message
        for entry in pending:
            entry.future.set_exception(ConnectionLost(message))

    def _read_loop(self) -> None:
        decoder = FrameDecoder(max_frame_size=answer_frame_size(self._max_frame_size))
        while not self._closed:
            try:
                data = self._sock.recv(RECV_SIZE)
            except TimeoutError:
                data = None
            except OSError:
                break
            if data == b"":
                break
            for event in decoder.feed(data or b""):
                if not self._dispatch(event):
                    return
            if self._stopped_answering():
                self.close(DependencyUnavailable(STOPPED_ANSWERING))
                return
        self.close(DependencyUnavailable("the enclave closed the connection"))

    def _stopped_answering(self) -> bool:
        """Whether an abandoned request is still unanswered at its ``drop_at`` (checked
        whenever the reader wakes: at least once per socket timeout)."""
        now = time.monotonic()
        with self._lock:
            while self._abandoned:
                drop_at, request_id = self._abandoned[0]
                entry = self._pending.get(request_id)
                if entry is None or entry.drop_at != drop_at:  # answered since
                    self._abandoned.popleft()
                    continue
                if drop_at > now:
                    return False
                logger.error(
                    "the enclave has not answered %s request %d for %d timeouts: "
                    "dropping the connection",
                    entry.message_type.name,
                    request_id,
                    LATE_ANSWER_TIMEOUTS,
                )
                return True
        return False

    def _dispatch(self, event: Event) -> bool:
        """Settle the request an event answers; False when the connection must close."""
        with self._lock:
            waiting = self._pending.get(event.request_id)
        reply = reply_to(event, None if waiting is None else waiting.message_type)
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
        if reply.error is not None:
            entry.future.set_exception(reply.error)
        else:
            entry.future.set_result(reply.body or {})
        if entry.drop_at is not None:
            hand_late_answer(entry.message_type, entry.late, reply.error, reply.body)


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

    ``timeout`` bounds each request (an answer not there in time raises
    DependencyUnavailable; the connection is dropped only once an answer is
    :data:`LATE_ANSWER_TIMEOUTS` timeouts late); ``connect_timeout`` bounds connecting and the
    HELLO exchange.
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
            sent = connection.submit(MessageType.HELLO, {"versions": sorted(SUPPORTED_VERSIONS)})
            if sent is None:
                raise DependencyUnavailable("the enclave closed the connection at once")
            hello = self._wait(connection, *sent, self._connect_timeout)
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
        self,
        connection: _Connection,
        request_id: int,
        future: Future[dict[str, Any]],
        timeout: float,
    ) -> dict[str, Any]:
        """The answer to ``request_id``; if it is not there within ``timeout``, the request
        is abandoned (the connection goes on) and DependencyUnavailable raised."""
        try:
            return future.result(timeout)
        except TimeoutError:
            late_by = (LATE_ANSWER_TIMEOUTS - 1) * timeout
            if not connection.abandon(request_id, time.monotonic() + late_by):
                return future.result()  # answered, or the connection lost, just now
            raise DependencyUnavailable(
                f"the enclave did not answer within {timeout:g} s"
            ) from None

    def _submit(
        self, message_type: MessageType, body: Mapping[str, Any], late: LateAnswer | None = None
    ) -> tuple[_Connection, int, Future[dict[str, Any]]]:
        for _ in range(2):
            connection = self._connect()
            sent = connection.submit(message_type, body, late)
            if sent is not None:
                return connection, *sent
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
        return self._submit(message_type, body)[2]

    def request(
        self,
        message_type: MessageType,
        body: Mapping[str, Any],
        *,
        idempotent: bool = False,
        late: LateAnswer | None = None,
    ) -> dict[str, Any]:
        """Send one request and wait for its answer (retried if idempotent and the connection
        was lost before the answer came). ``late`` takes the answer's body if it comes after
        the timeout (otherwise such an answer is dropped)."""
        for attempt in range(IDEMPOTENT_RETRIES + 1):
            connection, request_id, future = self._submit(message_type, body, late)
            try:
                return self._wait(connection, request_id, future, self._timeout)
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
