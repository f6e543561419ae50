"""The MQTT adapter: signing requests from devices over MQTT with TLS (``signd serve --mqtt``).

A device publishes one request per message to a topic under ``mqtt_request_topic``
(``signd/requests/#``; the levels the wildcard matches name the device)::

    {"id": "tx-42", "type": "ethereum/transaction", "key": "0x...", "transaction": {...},
     "reply_to": "signd/replies/device-7", "auth": {"authorization": "Bearer ..."}}

``type`` and the fields after it are exactly a ``POST /v1/sign/batch`` item; ``reply_to`` and
``auth`` are optional. The answer, published with QoS 1 to the reply topic, is
``{"id": ..., "result": {...}}`` or ``{"id": ..., "error": {"code", "message", "field"?}}``.
MQTT 5 properties are honoured: ``ResponseTopic`` over ``reply_to``; ``CorrelationData`` is
echoed back as a property and stands for ``id`` when the payload has none; user properties
join ``auth``.
The device's own reply topic is ``mqtt_reply_topic`` with ``{client}`` replaced by the
device's name (``signd/replies/device-7``); it is the reply topic by default, and one asked
for must be it or under it (:func:`is_allowed_reply_topic`).

Requests go through the same steps as REST: the :data:`~signd.api.service.Authenticator`
seam (it receives a request built from the message: ``POST /mqtt/<topic>``, the auth headers,
the payload as body), then :func:`~signd.gate.inputs.parse_mqtt_request` and
:func:`~signd.api.rest.perform_signing` over the server's :class:`SigningService`, so the
gate, the bounded thread pool, metrics and error codes are REST's.

A message that comes with the retain flag is refused (``invalid_request``), and the broker is
asked for no retained messages at subscription (:data:`REQUEST_SUBSCRIPTION`): a request is
acted on once, when it is published.

A request delivered twice (QoS 1 is at least once) is performed once: final answers are
remembered by request topic (which names the device) and ``id``, for
``mqtt_duplicate_window`` seconds and at most ``mqtt_duplicate_answers`` of them
(:class:`~signd.api.idempotency.RecentAnswers`). A copy (the same payload, ``ResponseTopic``
and ``CorrelationData``) gets its first copy's answer, waiting for it while it is performed,
without reaching the authenticator and the gate; the same ``id`` with another payload is
refused ``duplicate_request``.

paho's network thread receives messages, admits at most ``mqtt_max_pending`` at once (more
are answered ``too_many_requests``) and hands them to the event loop; paho reconnects with
exponential backoff (``mqtt_reconnect_min`` doubling up to ``mqtt_reconnect_max`` seconds)
and the adapter subscribes again on every connection.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from starlette.requests import Request
from starlette.types import Message

from signd.api.errors import PayloadTooLarge
from signd.api.idempotency import Answer, RecentAnswers, is_final_refusal
from signd.api.rest import error_body, perform_signing
from signd.api.service import Authenticator, SigningService
from signd.api.settings import MQTT_CLIENT, ApiSettings, is_topic_name, wildcard_levels
from signd.errors import (
    ConfigurationError,
    DependencyUnavailable,
    InvalidField,
    InvalidRequest,
    SigndError,
)
from signd.gate.inputs import MQTT_ENVELOPE_FIELDS, parse_json, parse_mqtt_request

log = logging.getLogger("signd.api.mqtt")

MAX_ID_LENGTH: Final = 256
INTEGER_IDS: Final = range(-(2**63), 2**64)
"""An integer ``id`` fits a 64-bit integer, signed or unsigned: what a device can hold."""
MAX_AUTH_HEADERS: Final = 32
PACKET_HEADROOM: Final = 64 * 1024
"""Over ``max_body_bytes``, room for the topic and properties in the largest packet the broker
may send signd (MQTT 5 ``MaximumPacketSize``); larger payloads get an error reply up to it."""
DRAIN_TIMEOUT: Final = 10.0
"""Seconds a stopping adapter waits for the requests it has admitted."""

REQUEST_SUBSCRIPTION: Final = SubscribeOptions(
    qos=1,
    noLocal=True,
    retainAsPublished=True,
    retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND,
)
"""A request is acted on once, when it is published: the broker sends no retained message at
subscription, and keeps the retain flag on what it forwards, so that a request published as a
retained message is seen as one (and refused: it would be signed again at every subscription
of every node)."""

RequestId = str | int


class TooManyRequests(SigndError):
    """More MQTT requests are in hand than ``mqtt_max_pending``; the device should retry."""

    code = "too_many_requests"
    http_status = 429


class RepliesInFlight:
    """Reply topics by message id until the broker acknowledges them, so that a reply it
    refuses (PUBACK reason code 0x80 or over, e.g. not authorised) can be logged with its
    topic: paho reports an acknowledgement by message id only, and may report it before
    ``publish`` has returned that id (then the reason waits here for the topic)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._topics: dict[int, str] = {}
        self._early: dict[int, ReasonCode] = {}

    def published(self, message_id: int, topic: str) -> ReasonCode | None:
        """Note a reply handed to paho; the broker's reason when it has answered already."""
        with self._lock:
            reason = self._early.pop(message_id, None)
            if reason is None:
                self._topics[message_id] = topic
            return reason

    def acknowledged(self, message_id: int, reason: ReasonCode) -> str | None:
        """The topic of the reply the broker answered; ``None`` while it is not noted yet."""
        with self._lock:
            topic = self._topics.pop(message_id, None)
            if topic is None:
                self._early[message_id] = reason
            return topic


def _warn_if_refused(topic: str, reason: ReasonCode) -> None:
    if reason.is_failure:
        log.warning("mqtt: the broker refused the reply to %s: %s", topic, reason.getName())


@dataclass(frozen=True, slots=True)
class Incoming:
    """An MQTT message as the adapter reads it: topic, payload, the MQTT 5 properties and
    whether it came with the retain flag."""

    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    retained: bool = False

    @classmethod
    def from_paho(cls, message: paho.MQTTMessage) -> Incoming:
        properties = message.properties
        return cls(
            message.topic,
            bytes(message.payload),
            getattr(properties, "ResponseTopic", None),
            getattr(properties, "CorrelationData", None),
            tuple(getattr(properties, "UserProperty", ())),
            bool(message.retain),
        )


@dataclass(slots=True)
class ReplyTo:
    """Where and how to answer a message; filled in as the message is read."""

    topic: str | None
    request_id: RequestId | None = None
    correlation_data: bytes | None = None

    def payload(self, answer: Mapping[str, Any]) -> bytes:
        return json.dumps({"id": self.request_id, **answer}, separators=(",", ":")).encode()


def own_reply_topic(topic: str, settings: ApiSettings) -> str | None:
    """The reply topic of the device a request topic names: ``mqtt_reply_topic`` with
    ``{client}`` replaced by the levels the request filter's wildcards match (the template
    itself when it has no ``{client}``); ``None`` when the topic names no device."""
    template = settings.mqtt_reply_topic
    if MQTT_CLIENT not in template:
        return template
    client = wildcard_levels(settings.mqtt_request_topic, topic)
    return template.replace(MQTT_CLIENT, client) if client else None


def is_allowed_reply_topic(topic: object, own: str | None, settings: ApiSettings) -> bool:
    """Whether signd may answer on a reply topic a message asks for (``ResponseTopic`` or
    ``reply_to``): a topic name outside the request filter and, when the device has its own
    reply topic (``own``), that topic or one under it.

    The broker lets each device read only its own replies; without the last rule any device
    could make signd publish into another's. A message on a topic that names no device has no
    own reply topic, and any topic name will do: the broker cannot tell apart the devices that
    share one request topic either.
    """
    if (
        not isinstance(topic, str)
        or not is_topic_name(topic)
        or wildcard_levels(settings.mqtt_request_topic, topic) is not None
    ):
        return False
    return own is None or topic == own or topic.startswith(own + "/")


def _reply_topic_refusal(given_as: str, own: str | None) -> InvalidField:
    if own is None:
        rule = "a topic name (no wildcards, not a request topic)"
    else:
        rule = f"the device's own reply topic {own} or a topic under it"
    return InvalidField(f"{given_as} must be {rule}", field="reply_to")


def default_reply(message: Incoming, settings: ApiSettings) -> ReplyTo:
    """The reply target known before the payload is read: the MQTT 5 ``ResponseTopic`` when
    it is allowed (:func:`is_allowed_reply_topic`), else the device's own reply topic."""
    own = own_reply_topic(message.topic, settings)
    reply = ReplyTo(own, correlation_data=message.correlation_data)
    if message.correlation_data is not None:
        reply.request_id = _correlation_id(message.correlation_data)
    if is_allowed_reply_topic(message.response_topic, own, settings):
        reply.topic = message.response_topic
    return reply


def _correlation_id(data: bytes) -> str:
    """CorrelationData as the reply's ``id``: its text, or ``0x``-hex when it is not UTF-8."""
    try:
        return data.decode()
    except UnicodeDecodeError:
        return "0x" + data.hex()


def read_envelope(
    message: Incoming, settings: ApiSettings, reply: ReplyTo
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The signing request (``type`` and its fields) and the auth headers of a message.

    ``reply`` learns the payload's valid ``reply_to`` and ``id`` before any error about the
    payload is raised, so that the error can be answered where the device listens.
    """
    if len(message.payload) > settings.max_body_bytes:
        raise PayloadTooLarge(f"the payload is over {settings.max_body_bytes} bytes")
    body = parse_json(message.payload)
    if not isinstance(body, dict):
        raise InvalidRequest("the payload must be a JSON object")
    errors: list[InvalidField] = []
    if "id" in body:
        request_id = body["id"]
        if (isinstance(request_id, str) and 0 < len(request_id) <= MAX_ID_LENGTH) or (
            isinstance(request_id, int)
            and not isinstance(request_id, bool)
            and request_id in INTEGER_IDS
        ):
            reply.request_id = request_id
        else:
            errors.append(
                InvalidField(
                    f"id must be a string of 1 to {MAX_ID_LENGTH} characters or an integer "
                    "from -2**63 to 2**64-1",
                    field="id",
                )
            )
    elif message.correlation_data is None:
        errors.append(
            InvalidField("id is required (or the MQTT 5 CorrelationData property)", field="id")
        )
    own = own_reply_topic(message.topic, settings)
    if message.response_topic is not None:
        if not is_allowed_reply_topic(message.response_topic, own, settings):
            errors.append(_reply_topic_refusal("the ResponseTopic property", own))
    elif "reply_to" in body:
        reply_to = body["reply_to"]
        if is_allowed_reply_topic(reply_to, own, settings):
            reply.topic = reply_to
        else:
            errors.append(_reply_topic_refusal("reply_to", own))
    if errors:
        raise errors[0]
    headers = _auth_headers(message.user_properties, body.get("auth", {}))
    request = {name: value for name, value in body.items() if name not in MQTT_ENVELOPE_FIELDS}
    return request, headers


def _auth_headers(
    user_properties: tuple[tuple[str, str], ...], auth: object
) -> list[tuple[str, str]]:
    if not isinstance(auth, dict) or not all(isinstance(v, str) for v in auth.values()):
        raise InvalidField("auth must be an object of header names to strings", field="auth")
    headers = [*user_properties, *auth.items()]
    names = [name.lower() for name, _ in headers]
    if len(headers) > MAX_AUTH_HEADERS or len(set(names)) != len(names):
        raise InvalidField(
            f"at most {MAX_AUTH_HEADERS} auth headers, each given once", field="auth"
        )
    for name, value in headers:
        if not name or not name.isascii() or not name.isprintable() or " " in name:
            raise InvalidField("an auth header name must be printable ASCII", field="auth")
        if not value.isprintable() or not all(ord(char) < 256 for char in value):
            raise InvalidField("an auth header value must be printable Latin-1", field="auth")
    return headers


def auth_request(message: Incoming, headers: list[tuple[str, str]], scheme: str) -> Request:
    """The message as the :data:`~signd.api.service.Authenticator` seam sees a REST request:
    ``POST /mqtt/<topic>`` with the auth headers and the payload as its body."""
    path = f"/mqtt/{message.topic}"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": scheme,
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(name.lower().encode(), value.encode("latin-1")) for name, value in headers],
        "client": None,
        "server": None,
        "extensions": {"signd.mqtt": {"topic": message.topic}},
    }

    async def receive() -> Message:
        return {"type": "http.request", "body": message.payload, "more_body": False}

    return Request(scope, receive)


def request_fingerprint(message: Incoming) -> tuple[bytes, str | None, bytes | None]:
    """What a copy of a request has in common with the first: the payload (its SHA-256) and
    the reply target it asks for. Not the user properties: a device asking again may sign
    its request anew, and the answer goes only where the first one went."""
    return (
        hashlib.sha256(message.payload).digest(),
        message.response_topic,
        message.correlation_data,
    )


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]


def tls_context(settings: ApiSettings) -> ssl.SSLContext:
    """TLS 1.2 or later, the broker's certificate checked against ``mqtt_ca`` and its
    host name, and signd's client certificate when one is configured."""
    try:
        context = ssl.create_default_context(cafile=settings.mqtt_ca)
        if settings.mqtt_cert is not None:
            context.load_cert_chain(settings.mqtt_cert, settings.mqtt_key)
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror or type(exc).__name__
        if exc.filename:
            reason = f"{exc.filename}: {reason}"
        raise ConfigurationError(
            f"cannot load the MQTT TLS files (mqtt_ca, mqtt_cert, mqtt_key): {reason}",
            field="api",
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class MqttAdapter:
    """Serves signing requests from an MQTT broker over one :class:`SigningService`.

    :meth:`run` serves until :meth:`stop` (called from the same event loop): then it
    unsubscribes, answers what it has admitted (for up to :data:`DRAIN_TIMEOUT` seconds) and
    disconnects. It adds the part ``mqtt`` to the service's readiness and sets the
    ``signd_mqtt_connected`` gauge: ready (1) only while connected and subscribed.
    """

    def __init__(self, service: SigningService, authenticate: Authenticator) -> None:
        self.service = service
        self.settings = settings = service.settings
        self.authenticate = authenticate
        self.host, self.port, use_tls = settings.mqtt_address()
        self._tls = tls_context(settings) if use_tls else None
        self._scheme = "mqtts" if use_tls else "mqtt"
        self._slots = threading.BoundedSemaphore(settings.mqtt_max_pending)
        self._accepting = False
        self._stopping = False
        self._stop: anyio.Event | None = None
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self._group: anyio.abc.TaskGroup | None = None
        self._client: paho.Client | None = None
        self._in_flight = RepliesInFlight()
        self._answers = RecentAnswers(
            settings.mqtt_duplicate_window, settings.mqtt_duplicate_answers
        )
        self.connected = threading.Event()
        """Set while connected and subscribed (readiness; tests wait on it)."""
        service.metrics.mqtt_connected.set(0)
        service.metrics.mqtt_duplicates.inc(amount=0)
        service.add_readiness_part("mqtt", self.check_connected)

    def check_connected(self) -> None:
        """The ``mqtt`` part of readiness: raises while signd is not connected to the broker
        and subscribed to the request topic (from start-up until the first subscription, and
        from each disconnection until the next)."""
        if not self.connected.is_set():
            raise DependencyUnavailable(
                "the MQTT broker is not connected: no requests are taken from "
                + self.settings.mqtt_request_topic
            )

    def _set_connected(self, connected: bool) -> None:
        if connected:
            self.connected.set()
        else:
            self.connected.clear()
        self.service.metrics.mqtt_connected.set(1 if connected else 0)

    def stop(self) -> None:
        self._stopping = True
        if self._stop is not None:
            self._stop.set()

    async def run(self) -> None:
        self._stop = anyio.Event()
        if self._stopping:
            return
        client = self._make_client()
        self._token = anyio.lowlevel.current_token()
        async with anyio.create_task_group() as group:
            self._group, self._client, self._accepting = group, client, True
            client.loop_start()
            log.info(
                "mqtt: connecting to %s:%d, requests on %s",
                self.host,
                self.port,
                self.settings.mqtt_request_topic,
            )
            try:
                await self._stop.wait()
            finally:
                with anyio.CancelScope(shield=True):
                    await self._shut_down(client)

    async def _shut_down(self, client: paho.Client) -> None:
        self._accepting = False
        client.unsubscribe(self.settings.mqtt_request_topic)
        drained = await anyio.to_thread.run_sync(self._drain, DRAIN_TIMEOUT)
        if not drained:
            log.warning("mqtt: stopping with requests still in hand after %gs", DRAIN_TIMEOUT)
        client.disconnect()
        await anyio.to_thread.run_sync(client.loop_stop)
        self._set_connected(False)
        log.info("mqtt: disconnected")

    def _drain(self, timeout: float) -> bool:
        """Wait until every admitted request is answered (all slots free)."""
        deadline = time.monotonic() + timeout
        held = 0
        try:
            while held < self.settings.mqtt_max_pending:
                if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    return False
                held += 1
            return True
        finally:
            for _ in range(held):
                self._slots.release()

    # paho's network thread

    def _make_client(self) -> paho.Client:
        settings = self.settings
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.mqtt_client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        client.on_log = self._on_log
        client.suppress_exceptions = True
        if self._tls is not None:
            client.tls_set_context(self._tls)
        client.reconnect_delay_set(settings.mqtt_reconnect_min, settings.mqtt_reconnect_max)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        connect = _properties(PacketTypes.CONNECT)
        connect.MaximumPacketSize = settings.max_body_bytes + PACKET_HEADROOM
        client.connect_async(
            self.host, self.port, settings.mqtt_keepalive, clean_start=True, properties=connect
        )
        return client

    def _on_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.error("mqtt: the broker refused the connection: %s", reason.getName())
            return
        log.info("mqtt: connected to %s:%d", self.host, self.port)
        client.subscribe(self.settings.mqtt_request_topic, options=REQUEST_SUBSCRIPTION)

    def _on_connect_fail(self, client: paho.Client, userdata: object) -> None:
        log.warning("mqtt: cannot connect to %s:%d, retrying", self.host, self.port)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._set_connected(False)
        if self._accepting:
            log.warning("mqtt: disconnected (%s), reconnecting", reason.getName())

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if any(reason.is_failure for reason in reasons):
            log.error(
                "mqtt: the broker refused the subscription to %s: %s",
                self.settings.mqtt_request_topic,
                ", ".join(reason.getName() for reason in reasons),
            )
            return
        self._set_connected(True)
        log.info("mqtt: subscribed to %s", self.settings.mqtt_request_topic)

    def _on_publish(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reason: ReasonCode,
        properties: Properties,
    ) -> None:
        topic = self._in_flight.acknowledged(mid, reason)
        if topic is not None:
            _warn_if_refused(topic, reason)

    def _on_log(self, client: paho.Client, userdata: object, level: int, text: str) -> None:
        """paho's errors and warnings, except those a deliberate disconnect causes. Not its
        debug lines: they show MQTT 5 user properties, which may carry auth headers."""
        if not self._accepting:
            return
        if level == paho.MQTT_LOG_ERR:
            log.error("mqtt: %s", text)
        elif level == paho.MQTT_LOG_WARNING:
            log.warning("mqtt: %s", text)

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        """Admit the message and hand it to the event loop, or refuse it; never raises (paho
        would only log it)."""
        try:
            self._admit(Incoming.from_paho(message))
        except Exception:
            log.exception("mqtt: a message from the request topic was dropped")

    def _admit(self, incoming: Incoming) -> None:
        if incoming.retained:
            self._refuse(
                incoming,
                InvalidRequest(
                    "a retained message is not a request; publish requests without retain"
                ),
            )
        elif not self._accepting:
            self._refuse(incoming, DependencyUnavailable("signd is stopping; try again"))
        elif not self._slots.acquire(blocking=False):
            self._refuse(
                incoming,
                TooManyRequests(
                    f"over {self.settings.mqtt_max_pending} requests in hand; try again"
                ),
            )
        else:
            try:
                assert self._group is not None
                anyio.from_thread.run_sync(
                    self._group.start_soon, self._handle, incoming, token=self._token
                )
            except BaseException:
                self._slots.release()
                raise

    def _refuse(self, message: Incoming, error: SigndError) -> None:
        """Answer a message that will not be handled, with what can be read of it cheaply."""
        reply = default_reply(message, self.settings)
        with contextlib.suppress(SigndError):
            read_envelope(message, self.settings, reply)
        self._answer(message, reply, {"error": error_body(error, self.service.metrics)[1]})

    # the event loop

    async def _handle(self, message: Incoming) -> None:
        """Answer one admitted message, then free its slot."""
        try:
            reply = default_reply(message, self.settings)
            self._answer(message, reply, await self._sign(message, reply))
        except Exception:
            log.exception("mqtt: the message on %s was not answered", message.topic)
        finally:
            self._slots.release()

    async def _sign(self, message: Incoming, reply: ReplyTo) -> Answer:
        """``{"result"}`` or ``{"error"}``: the envelope read, then the answer of the request's
        first copy, performed once (:meth:`_perform`) for all of them."""
        try:
            body, headers = read_envelope(message, self.settings, reply)
            answer, repeated = await self._answers.answer_once(
                (message.topic, reply.request_id),
                request_fingerprint(message),
                lambda: self._perform(message, reply, body, headers),
            )
        except Exception as exc:
            return {"error": error_body(exc, self.service.metrics)[1]}
        if repeated:
            self.service.metrics.mqtt_duplicates.inc()
            log.info(
                "mqtt: request %r on %s is a copy: answered as its first copy was",
                reply.request_id,
                message.topic,
            )
        return answer

    async def _perform(
        self,
        message: Incoming,
        reply: ReplyTo,
        body: dict[str, Any],
        headers: list[tuple[str, str]],
    ) -> tuple[Answer, bool]:
        """REST's authentication, validation and signing; the answer and whether it is final
        (to be given again to copies of the request)."""
        try:
            principal = await self.authenticate(auth_request(message, headers, self._scheme))
            request = parse_mqtt_request(body)
            result = await perform_signing(self.service, principal, request)
        except Exception as exc:
            status, error = error_body(exc, self.service.metrics)
            return {"error": error}, is_final_refusal(status)
        log.info(
            "mqtt: request %r on %s signed (%s)", reply.request_id, message.topic, request.kind
        )
        return {"result": result}, True

    def _answer(self, message: Incoming, reply: ReplyTo, answer: Mapping[str, Any]) -> None:
        """Publish the answer (QoS 1), or log why there is nowhere to publish it; a reply the
        broker refuses is logged when it says so (:meth:`_on_publish`)."""
        if "error" in answer:
            error = answer["error"]
            log.warning(
                "mqtt: request %r on %s answered %s%s",
                reply.request_id,
                message.topic,
                error["code"],
                f" (field {error['field']})" if "field" in error else "",
            )
        if reply.topic is None:
            log.warning("mqtt: no reply topic for the message on %s; not answered", message.topic)
            return
        properties = _properties(PacketTypes.PUBLISH)
        properties.ContentType = "application/json"
        if reply.correlation_data is not None:
            properties.CorrelationData = reply.correlation_data
        client = self._client
        assert client is not None
        info = client.publish(reply.topic, reply.payload(answer), qos=1, properties=properties)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("mqtt: cannot publish the reply to %s: %s", reply.topic, info.rc.name)
            return
        reason = self._in_flight.published(info.mid, reply.topic)
        if reason is not None:
            _warn_if_refused(reply.topic, reason)
