"""The enclave's socket server: frames in, :class:`EnclaveSigner` calls, frames out.

One thread reads each connection; requests run on a shared worker pool, so answers go back in
whatever order they finish, matched by request id. A connection that sends garbage gets an
error frame and is closed; other connections are not affected. :func:`run_enclave` is the
process entry point (``signd enclave``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final

import coincurve

from signd.attestation.document import MAX_USER_FIELD_SIZE
from signd.attestation.providers import AttestationProvider
from signd.chains import address_deriver
from signd.enclave.cache import UnsealedKeyCache
from signd.enclave.gate import EnclaveGate
from signd.enclave.protocol import (
    CUSTODY_ENCLAVE,
    CUSTODY_HSM,
    CUSTODY_VERSION,
    DEFAULT_MAX_FRAME_SIZE,
    MAX_BATCH,
    Flag,
    Frame,
    FrameDecoder,
    HsmKeyReference,
    KeyReference,
    MessageType,
    ProtocolViolation,
    answer_frame_size,
    check_attestation_nonce,
    encode_error,
    encode_frame,
    negotiate_version,
    request_custody,
    request_labels,
    require_bytes,
    require_int,
    require_list,
    require_str,
)
from signd.enclave.signer import AddressFunction, EnclaveSigner, Unsealing
from signd.enclave.transport import close_socket, listen_socket
from signd.errors import (
    AccessDenied,
    ConfigurationError,
    InvalidField,
    InvalidRequest,
    SigndError,
    UnsupportedOperation,
)

if TYPE_CHECKING:
    from signd.enclave.hsm import EnclaveHsm
from signd.kms.base import KmsClient
from signd.storage.base import BlobStore

logger = logging.getLogger(__name__)

RECV_SIZE: Final = 1 << 16
ACCEPT_POLL: Final = 0.2
MAX_OFFERED_VERSIONS: Final = 16
DEFAULT_MAX_IN_FLIGHT: Final = 64
DEFAULT_WORKERS: Final = 8
"""Threads for requests other than CREATE_KEYS: signing is CPU-bound, and more threads than
this only contend for the interpreter lock (measured: 64 sign ~20% slower than 8)."""

AttestationUserData = Callable[[], bytes | None]
"""Gives the ``user_data`` of each ATTESTATION document (``None``: the document has none)."""


def no_attestation_user_data() -> bytes | None:
    """The default :attr:`EnclaveApp.attestation_user_data`: documents carry no user data."""
    return None


class EnclaveApp:
    """Answers one request frame with one response frame; never raises.

    Requests for sealed keys go to ``signer``; requests naming ``custody: "hsm"`` go to ``hsm``
    (an enclave without one refuses them with ConfigurationError). ATTESTATION asks
    ``attestation`` (the NSM, or the simulated one) for a document; an enclave without one
    refuses with UnsupportedOperation.

    With ``gate_only``, the enclave's keys sign only through the gate (GATE): raw SIGN_DIGEST
    and SIGN_DIGESTS are refused for sealed keys and for keys of its HSM, and raw CREATE_KEYS
    for sealed keys, so a compromised host cannot get a digest signed that the policy would
    refuse, nor skip its audit record. ``signd serve`` starts its local enclave so; on Nitro
    the image's configuration says so. Keys of the enclave's HSM are still made on the host's
    request once the gate has approved it (their labels are the host's word, see
    docs/POLICY.md).

    :attr:`attestation_user_data` is called for every ATTESTATION and its answer becomes the
    document's ``user_data``: assign it to bind what the enclave enforces into its documents.
    Intended content: ``sha256(policy file) || sha256(clients file)`` of the files in force
    (64 bytes), so a verifier can check which policy and clients the attested code applies.
    It must return quickly, at most 1024 bytes or ``None``, and never a secret.
    """

    def __init__(
        self,
        signer: EnclaveSigner,
        *,
        hsm: EnclaveHsm | None = None,
        attestation: AttestationProvider | None = None,
        gate: EnclaveGate | None = None,
        gate_only: bool = False,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        if gate_only and gate is None:
            raise ConfigurationError("a gate-only enclave needs its gate")
        self.signer = signer
        self.hsm = hsm
        self.attestation = attestation
        self.attestation_user_data: AttestationUserData = no_attestation_user_data
        self.gate = gate
        self.gate_only = gate_only
        self.max_frame_size = max_frame_size
        self._handlers: dict[MessageType, Callable[[dict[str, Any]], dict[str, Any]]] = {
            MessageType.HELLO: self._hello,
            MessageType.HEALTH: self._health,
            MessageType.CREATE_KEYS: self._create_keys,
            MessageType.SIGN_DIGEST: self._sign_digest,
            MessageType.SIGN_DIGESTS: self._sign_digests,
            MessageType.FLUSH_CACHE: self._flush_cache,
            MessageType.ATTESTATION: self._attestation,
        }
        if gate is not None:
            self.attestation_user_data = gate.attestation_user_data
            self._handlers |= {
                MessageType.GATE: gate.gate,
                MessageType.GATE_CONFIGURE: gate.configure,
                MessageType.AUDIT_VERIFY: gate.audit_verify,
            }

    def answers_at_once(self, frame: Frame) -> bool:
        """Whether ``frame`` is a GATE this enclave answers from memory (no KMS, storage or
        HSM call), so the connection's own thread may answer it without a hand-off to the
        worker pool."""
        if self.gate is None or frame.message_type is not MessageType.GATE or frame.is_response:
            return False
        try:
            return self.gate.answers_without_io(frame.body)
        except Exception:  # a body too odd to judge: the pool answers it (with its error)
            return False

    def handle(self, frame: Frame) -> bytes:
        """The encoded answer to a request frame: its result, or an ERROR frame."""
        try:
            handler = self._handlers.get(frame.message_type)
            if handler is None or frame.is_response:
                raise InvalidRequest(f"{frame.message_type.name} is not a request")
            if frame.version < CUSTODY_VERSION and _names_custody(frame.body):
                raise InvalidRequest(f"custody needs protocol version {CUSTODY_VERSION}")
            body = handler(frame.body)
            return self._encode_answer(frame, body)
        except SigndError as error:
            return encode_error(frame.request_id, error, version=frame.version)
        except Exception as error:
            logger.error(
                "enclave %s request failed: %s", frame.message_type.name, type(error).__name__
            )
            failure = SigndError("the enclave failed to handle the request")
            return encode_error(frame.request_id, failure, version=frame.version)

    def _encode_answer(self, frame: Frame, body: dict[str, Any]) -> bytes:
        """The answer frame of ``body``. An answer that cannot be encoded (too large, or text
        without a UTF-8 form) but carries sealed audit records still delivers them, with an
        error for the rest: the records are already part of the chain, and the host must
        append them before the next ones."""
        try:
            return self._encode(frame, body)
        except Exception as error:
            audit = body.get("audit")
            if not isinstance(audit, list):
                raise
            logger.error(
                "enclave %s answer could not be encoded (%s); sending its audit records only",
                frame.message_type.name,
                type(error).__name__,
            )
            failure = SigndError("the enclave could not encode its answer")
            return self._encode(frame, {"audit": audit, "error": failure.to_dict()})

    def _encode(self, frame: Frame, body: dict[str, Any]) -> bytes:
        return encode_frame(
            frame.message_type,
            frame.request_id,
            body,
            flags=Flag.RESPONSE,
            version=frame.version,
            max_frame_size=answer_frame_size(self.max_frame_size),
        )

    def _hello(self, body: dict[str, Any]) -> dict[str, Any]:
        offered = require_list(body, "versions", max_length=MAX_OFFERED_VERSIONS)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in offered):
            raise InvalidField("versions must be integers", field="versions")
        custody = [CUSTODY_ENCLAVE] if self.hsm is None else [CUSTODY_ENCLAVE, CUSTODY_HSM]
        return {
            "version": negotiate_version(offered),
            "max_frame_size": self.max_frame_size,
            "max_batch": self.signer.max_batch,
            "custody": custody,
            "gate_only": self.gate_only,
        }

    def _hsm(self) -> EnclaveHsm:
        if self.hsm is None:
            raise ConfigurationError(
                "this enclave holds no HSM custody; set [hsm] in_enclave = true in its config"
            )
        return self.hsm

    def _health(self, body: dict[str, Any]) -> dict[str, Any]:
        if request_custody(body) == CUSTODY_HSM:
            self._hsm().check_health()
        else:
            self.signer.check_health()
        return {"status": "ok", "cached_keys": self.signer.cached_keys}

    def _create_keys(self, body: dict[str, Any]) -> dict[str, Any]:
        chain = require_str(body, "chain")
        count = require_int(body, "count", minimum=1, maximum=self.signer.max_batch)
        labels = request_labels(body)
        if request_custody(body) == CUSTODY_ENCLAVE:
            self._refuse_without_gate("make")
            created_keys = self.signer.create_keys(chain, count, labels)
            return {"keys": [key.to_body() for key in created_keys]}
        if labels:
            raise InvalidField("only sealed keys bind labels", field="labels")
        created, error = self._hsm().create_keys(chain, count)
        answer: dict[str, Any] = {"keys": [key.to_body() for key in created]}
        if error is not None:
            answer["error"] = error.to_dict()
        return answer

    def _sign(self, item: Any, unsealing: Unsealing | None = None) -> bytes:
        if not isinstance(item, dict):
            raise InvalidField("each item must be a map", field="items")
        self._refuse_without_gate("sign with")
        if request_custody(item) == CUSTODY_HSM:
            hsm_key = HsmKeyReference.from_body(item)
            return self._hsm().sign_digest(hsm_key, require_bytes(item, "digest", size=32))
        key = KeyReference.from_body(item)
        digest = require_bytes(item, "digest", size=32)
        return self.signer.sign_digest(key, digest, unsealing).to_bytes()

    def _refuse_without_gate(self, what: str) -> None:
        if self.gate_only:
            raise AccessDenied(
                f"this enclave does not {what} its keys outside its gate: send the request"
                " in a GATE message (signd serve does), where it is authenticated, checked"
                " against the policy and audited"
            )

    def _sign_digest(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"signature": self._sign(body)}

    def _sign_digests(self, body: dict[str, Any]) -> dict[str, Any]:
        items = require_list(body, "items", max_length=self.signer.max_batch)
        results: list[dict[str, Any]] = []
        unsealing = self.signer.unsealing(_references(items))
        for item in items:
            try:
                results.append({"signature": self._sign(item, unsealing)})
            except SigndError as error:
                results.append({"error": error.to_dict()})
        return {"results": results}

    def _flush_cache(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"flushed": self.signer.flush_cache()}

    def _attestation(self, body: dict[str, Any]) -> dict[str, Any]:
        nonce = check_attestation_nonce(body.get("nonce"))
        if self.attestation is None:
            raise UnsupportedOperation(
                "this enclave has no attestation provider ([enclave] attestation is off)"
            )
        user_data = self.attestation_user_data()
        if user_data is not None and (
            type(user_data) is not bytes or len(user_data) > MAX_USER_FIELD_SIZE
        ):
            raise ConfigurationError(
                f"attestation_user_data must give at most {MAX_USER_FIELD_SIZE} bytes or None"
            )
        return {"document": self.attestation.attest(user_data=user_data, nonce=nonce)}


def _names_custody(body: dict[str, Any]) -> bool:
    """Whether a request (or any item of a batch) names a custody."""
    items = body.get("items")
    return "custody" in body or (
        isinstance(items, list) and any(isinstance(i, dict) and "custody" in i for i in items)
    )


class _Writer:
    """Serialises whole frames onto one socket from many worker threads."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self.broken = False

    def send(self, data: bytes) -> None:
        with self._lock:
            if self.broken:
                return
            try:
                self._sock.sendall(data)
            except OSError:
                self.broken = True


class EnclaveServer:
    """Serves the enclave protocol on any number of connections.

    ``workers`` threads run requests; each connection may have ``max_in_flight`` requests
    running at once (its reader stops reading until one finishes). A GATE the enclave can
    answer from memory (:meth:`EnclaveApp.answers_at_once`) is answered by the connection's
    own thread, at once. ``io_timeout`` bounds how
    long a send to a client that stopped reading may block.

    CREATE_KEYS run on a pool of their own, of ``max_in_flight`` threads: a small one waits
    in its thread for its group commit (:class:`~signd.enclave.signer.EnclaveSigner`), so
    this lets as many share a group as a connection may send, and none holds up signing.
    """

    def __init__(
        self,
        app: EnclaveApp,
        *,
        workers: int = DEFAULT_WORKERS,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        io_timeout: float = 30.0,
    ) -> None:
        self.app = app
        self._max_in_flight = max_in_flight
        self._io_timeout = io_timeout
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="signd-enclave")
        self._create_pool = ThreadPoolExecutor(
            max_workers=max_in_flight, thread_name_prefix="signd-enclave-create"
        )
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._accept_thread: threading.Thread | None = None
        self._closed = threading.Event()
        self.address: str | None = None

    def __repr__(self) -> str:
        return f"EnclaveServer(address={self.address!r})"

    def listen(self, address: str) -> None:
        """Accept connections on ``address`` (``unix:///...`` or ``vsock://CID:PORT``)."""
        listener = listen_socket(address)
        listener.settimeout(ACCEPT_POLL)
        self.address = address
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(listener,), name="signd-enclave-accept", daemon=True
        )
        self._accept_thread.start()
        logger.info("enclave listening on %s", address)

    def _accept_loop(self, listener: socket.socket) -> None:
        """Accept until closed, then close the listener (and remove a Unix socket file)."""
        try:
            while not self._closed.is_set():
                try:
                    sock, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    logger.warning("enclave listener failed; no longer accepting")
                    return
                self.serve_connection(sock)
        finally:
            if listener.family == socket.AF_UNIX:
                with contextlib.suppress(OSError):
                    os.unlink(listener.getsockname())
            listener.close()

    def serve_connection(self, sock: socket.socket) -> None:
        """Serve one connected socket in the background (and own it)."""
        with self._lock:
            if self._closed.is_set():
                sock.close()
                return
            self._connections.add(sock)
        sock.settimeout(self._io_timeout)
        threading.Thread(
            target=self._serve, args=(sock,), name="signd-enclave-conn", daemon=True
        ).start()

    def _serve(self, sock: socket.socket) -> None:
        decoder = FrameDecoder(max_frame_size=self.app.max_frame_size)
        writer = _Writer(sock)
        slots = threading.BoundedSemaphore(self._max_in_flight)
        try:
            while not self._closed.is_set() and not writer.broken:
                try:
                    data = sock.recv(RECV_SIZE)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                for event in decoder.feed(data):
                    if isinstance(event, ProtocolViolation):
                        writer.send(encode_error(event.request_id, event.error))
                        if event.fatal:
                            logger.warning("closed a connection: %s", event.error.message)
                            return
                        continue
                    if self.app.answers_at_once(event):
                        writer.send(self.app.handle(event))
                        continue
                    slots.acquire()
                    if not self._submit(writer, slots, event):
                        return
        finally:
            self._drain(slots)
            with self._lock:
                self._connections.discard(sock)
            close_socket(sock)

    def _submit(self, writer: _Writer, slots: threading.BoundedSemaphore, frame: Frame) -> bool:
        """Run a request on the pool; False when the server is shutting down."""

        def respond() -> None:
            try:
                writer.send(self.app.handle(frame))
            finally:
                slots.release()

        creates = frame.message_type is MessageType.CREATE_KEYS
        try:
            (self._create_pool if creates else self._pool).submit(respond)
        except RuntimeError:
            slots.release()
            return False
        return True

    def _drain(self, slots: threading.BoundedSemaphore) -> None:
        """Let a connection's running requests answer before it closes (up to ``io_timeout``)."""
        deadline = time.monotonic() + self._io_timeout
        for _ in range(self._max_in_flight):
            if not slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                return

    def close(self) -> None:
        """Stop accepting, close every connection and wait for running requests."""
        self._closed.set()
        if self._accept_thread is not None:
            self._accept_thread.join()
        with self._lock:
            connections = list(self._connections)
        for sock in connections:
            close_socket(sock)
        self._pool.shutdown(wait=True)
        self._create_pool.shutdown(wait=True)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`close`; False if ``timeout`` passed first."""
        return self._closed.wait(timeout)


def start_enclave(
    listen: str | None,
    kms: KmsClient,
    blobs: BlobStore,
    *,
    cache: UnsealedKeyCache[KeyReference, coincurve.PrivateKey] | None = None,
    address_deriver: Callable[[str], AddressFunction] = address_deriver,
    max_batch: int = MAX_BATCH,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    workers: int = DEFAULT_WORKERS,
    hsm: EnclaveHsm | None = None,
    attestation: AttestationProvider | None = None,
    gate_only: bool = False,
) -> EnclaveServer:
    """Build the enclave application and serve it; ``listen=None`` serves in-process only.

    ``hsm`` adds HSM custody (the caller keeps owning it and closes it after the server);
    ``attestation`` answers ATTESTATION requests; ``gate_only`` refuses sealed keys' raw
    requests (see :class:`EnclaveApp`).
    """
    signer = EnclaveSigner(
        kms, blobs, cache=cache, address_deriver=address_deriver, max_batch=max_batch
    )
    app = EnclaveApp(
        signer,
        hsm=hsm,
        attestation=attestation,
        gate=EnclaveGate(signer, kms, hsm=hsm),
        gate_only=gate_only,
        max_frame_size=max_frame_size,
    )
    server = EnclaveServer(app, workers=workers)
    if listen is not None:
        try:
            server.listen(listen)
        except SigndError:
            server.close()
            raise
    return server


WAKE_INTERVAL: Final = 0.5
"""Seconds between the main thread's checks for a stop while the enclave serves."""


def run_enclave(
    listen: str,
    kms: KmsClient,
    blobs: BlobStore,
    *,
    stop: threading.Event | None = None,
    cache: UnsealedKeyCache[KeyReference, coincurve.PrivateKey] | None = None,
    address_deriver: Callable[[str], AddressFunction] = address_deriver,
    max_batch: int = MAX_BATCH,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    workers: int = DEFAULT_WORKERS,
    hsm: EnclaveHsm | None = None,
    attestation: AttestationProvider | None = None,
    gate_only: bool = False,
) -> None:
    """Serve the enclave on ``listen`` until ``stop`` is set (or the process is interrupted)."""
    server = start_enclave(
        listen,
        kms,
        blobs,
        cache=cache,
        address_deriver=address_deriver,
        max_batch=max_batch,
        max_frame_size=max_frame_size,
        workers=workers,
        hsm=hsm,
        attestation=attestation,
        gate_only=gate_only,
    )
    done = server.wait if stop is None else stop.wait
    try:
        # Woken every WAKE_INTERVAL: a SIGTERM taken by another thread leaves this one
        # asleep, and its Python handler (which sets ``stop``) runs only on this thread.
        while not done(WAKE_INTERVAL):
            pass
    finally:
        server.close()


def _references(items: list[Any]) -> Iterator[KeyReference]:
    """The sealed keys a SIGN_DIGESTS batch names (items that name none are left to say so)."""
    for item in items:
        if isinstance(item, dict) and request_custody(item) != CUSTODY_HSM:
            try:
                yield KeyReference.from_body(item)
            except SigndError:
                continue
