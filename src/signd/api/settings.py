"""The service's settings: the ``[api]`` table of ``signd.toml``, overridden by ``signd serve``.

Frozen and validated once at start-up; an unknown or mistyped setting is a
:class:`~signd.errors.ConfigurationError` then, never at first use.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from signd.auth.request_signing import (
    DEFAULT_NONCE_CAPACITY,
    MAX_NONCE_CAPACITY,
    default_nonce_quota,
)
from signd.enclave.protocol import DEFAULT_MAX_FRAME_SIZE
from signd.errors import ConfigurationError
from signd.gate.interpret import Limits

DEFAULT_PORT = 8645
MAX_BODY_BYTES: Final = DEFAULT_MAX_FRAME_SIZE // 2
"""The largest request body: half an enclave frame, so that the body, its auth headers and
the keys it names fit in the one GATE frame that carries it to the enclave's gate."""
MQTT_PORTS: Final = {"mqtts": 8883, "mqtt": 1883}
MQTT_CLIENT: Final = "{client}"
"""In ``mqtt_reply_topic``: the request topic's levels matched by the request filter's
wildcards (``device-7`` for ``signd/requests/device-7`` under ``signd/requests/#``)."""
_MAX_TOPIC_BYTES: Final = 65535


def is_topic_name(topic: object) -> bool:
    """A topic one may publish to: non-empty UTF-8, no wildcards, no NUL, not ``$``-reserved."""
    return (
        isinstance(topic, str)
        and 0 < len(topic.encode("utf-8", "surrogatepass")) <= _MAX_TOPIC_BYTES
        and not topic.startswith("$")
        and not any(char in topic for char in "+#\0")
    )


def topic_filter_levels(topic_filter: str) -> list[str]:
    """The levels of a subscription filter without a ``$share/<group>/`` prefix; raises
    :class:`ValueError` when the filter is not valid."""
    levels = topic_filter.split("/")
    if levels[0] == "$share":
        if len(levels) < 3 or not levels[1] or any(char in levels[1] for char in "+#"):
            raise ValueError("a shared subscription is $share/<group>/<filter>")
        levels = levels[2:]
    if not topic_filter or "\0" in topic_filter or levels[0].startswith("$"):
        raise ValueError("not a topic filter")
    for index, level in enumerate(levels):
        if ("+" in level or "#" in level) and level not in ("+", "#"):
            raise ValueError("a wildcard must be a whole topic level")
        if level == "#" and index != len(levels) - 1:
            raise ValueError("# must be the last topic level")
    return levels


def wildcard_levels(topic_filter: str, topic: str) -> str | None:
    """The levels of ``topic`` that the filter's wildcards match, joined with ``/``
    (``""`` when there are none); ``None`` when the filter does not match the topic."""
    levels = topic.split("/")
    filter_levels = topic_filter_levels(topic_filter)
    matched: list[str] = []
    for index, level in enumerate(filter_levels):
        if level == "#":
            matched.extend(levels[index:])
            return "/".join(matched)
        if index >= len(levels):
            return None
        if level == "+":
            matched.append(levels[index])
        elif level != levels[index]:
            return None
    return "/".join(matched) if len(levels) == len(filter_levels) else None


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """How the REST and JSON-RPC service behaves."""

    allow_blind_signing: bool = False
    """Serve ``POST /v1/sign/hash`` (signing an opaque 32-byte digest). Off unless asked for."""
    max_body_bytes: int = MAX_BODY_BYTES
    """Larger request bodies are refused with 413 (at most :data:`MAX_BODY_BYTES`)."""
    body_timeout: float = 30.0
    """Seconds a client has to send a request's whole body, from when signd starts reading it
    (before authentication, which covers the body); later, 408 ``request_timeout`` and the
    connection is closed, so that a stalled client cannot hold it."""
    max_connections: int = 1000
    """Most HTTP connections ``signd serve`` serves requests on at once: a request that arrives
    while this many others are open gets uvicorn's own plain-text 503 (its
    ``limit_concurrency``; docs/API.md, Limits)."""
    max_batch: int = 100
    """Most requests in one ``POST /v1/sign/batch`` or one JSON-RPC batch."""
    max_keys_per_request: int = 1000
    """Most keys one ``POST /v1/keys`` creates."""
    rate_limit: float = 0.0
    """Requests per second each authenticated client may make, on average (a token bucket
    per client id, REST, JSON-RPC and MQTT together); more get 429 ``rate_limited``. 0: no
    limit (the default: clients are registered services whose load the operator knows)."""
    rate_limit_burst: int = 100
    """Requests a client may make at once before ``rate_limit`` paces it (the bucket's size)."""
    auth_failure_rate_limit: float = 5.0
    """Failed authentications per second each remote address may cause, on average; once its
    bucket is empty, that address's requests get 429 before they are authenticated (no
    signature check, no audit record) until it refills. 0: no limit."""
    auth_failure_burst: int = 50
    """Failed authentications an address may cause at once."""
    auth_failure_audit_rate: float = 2.0
    """Failed authentications the gate seals one audit record each per second, on average,
    from all addresses together; past it, they are counted and each count is sealed as one
    record. 0: every failed authentication has its own record."""
    auth_failure_audit_burst: int = 1000
    """Failed authentications the gate records one by one at once."""
    nonce_capacity: int = DEFAULT_NONCE_CAPACITY
    """Signed requests' nonces the gate keeps at once, each until its request's timestamp
    leaves the 300 s window (about 110 bytes each); past it, signed requests are refused."""
    nonce_quota: int | None = None
    """Nonces one client may keep at once; past it, that client's signed requests are
    refused (401) until older ones expire. None: a quarter of ``nonce_capacity``."""
    signing_threads: int = 8
    """Blocking custody calls run in a thread pool this wide."""
    health_timeout: float = 5.0
    """Seconds ``/readyz`` waits for one backend's health check."""
    downstream: str | None = None
    """An Ethereum node's JSON-RPC URL: unknown methods are proxied to it and
    ``eth_sendTransaction`` fills nonce, gas, fees and chain id from it."""
    downstream_timeout: float = 10.0
    chain_id: int | None = None
    """What ``eth_chainId`` answers; without it, the downstream node's chain id."""
    accounts: tuple[str, ...] = ()
    """What ``eth_accounts`` lists (addresses or key ids); empty: see ``accounts_label``."""
    accounts_label: str | None = None
    """With no ``accounts``: list Ethereum keys with this label (all of them when unset)."""
    max_accounts: int = 1000
    """Most addresses ``eth_accounts`` lists when it lists keys by label or all of them."""
    mqtt: str | None = None
    """An MQTT broker to take signing requests from: ``mqtts://host[:8883]``, or
    ``mqtt://host[:1883]`` (no TLS) only with ``mqtt_allow_plaintext``."""
    mqtt_ca: str | None = None
    """PEM file of the CA(s) that sign the broker's certificate; the system's when unset."""
    mqtt_cert: str | None = None
    """PEM file of signd's client certificate (with ``mqtt_key``)."""
    mqtt_key: str | None = None
    """PEM file of the client certificate's private key (not encrypted)."""
    mqtt_allow_plaintext: bool = False
    """Allow ``mqtt://``: requests and signatures in the clear. Tests only."""
    mqtt_request_topic: str = "signd/requests/#"
    """The filter signd subscribes to (``$share/<group>/...`` spreads requests over nodes)."""
    mqtt_reply_topic: str = "signd/replies/" + MQTT_CLIENT
    """Where answers go when a request names no reply topic."""
    mqtt_client_id: str = ""
    """signd's MQTT client id; empty: the broker assigns one."""
    mqtt_max_pending: int = 64
    """Most MQTT requests being handled at once; more are answered ``too_many_requests``."""
    mqtt_duplicate_window: float = 600.0
    """Seconds an MQTT answer is remembered for copies of its request (a redelivery, a device
    asking again): they get it again instead of being performed again. The default covers a
    request signature's whole validity (twice its 300 s clock window). 0: not remembered."""
    mqtt_duplicate_answers: int = 10_000
    """Most MQTT answers remembered for copies of their requests (the oldest are forgotten
    first). 0: not remembered."""
    mqtt_keepalive: int = 30
    """Seconds between MQTT keep-alive pings."""
    mqtt_reconnect_min: int = 1
    """Seconds before the first reconnection attempt; doubled on each failure."""
    mqtt_reconnect_max: int = 60
    """Longest wait between reconnection attempts."""
    clients_file: str | None = None
    """The registered clients (TOML); ``{home}/clients.toml`` when unset."""
    policy_file: str | None = None
    """The signing policy (TOML); ``{home}/policy.toml`` when unset."""
    audit_log: str | None = None
    """The sealed audit records (JSON lines); ``{home}/audit.log`` when unset."""

    def __post_init__(self) -> None:
        for name in (
            "max_body_bytes",
            "max_batch",
            "max_keys_per_request",
            "signing_threads",
            "max_connections",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"api.{name} must be a positive integer", field="api")
        if self.max_body_bytes > MAX_BODY_BYTES:
            raise ConfigurationError(
                f"api.max_body_bytes must be at most {MAX_BODY_BYTES} (a request travels to the "
                "enclave's gate in one frame)",
                field="api",
            )
        for name in ("rate_limit_burst", "auth_failure_burst", "auth_failure_audit_burst"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"api.{name} must be a positive integer", field="api")
        self._check_nonces()
        for name in ("rate_limit", "auth_failure_rate_limit", "auth_failure_audit_rate"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ConfigurationError(
                    f"api.{name} must be a number of requests per second (0: no limit)",
                    field="api",
                )
        for name in ("body_timeout", "health_timeout", "downstream_timeout"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ConfigurationError(
                    f"api.{name} must be a positive number of seconds", field="api"
                )
        if self.downstream is not None and not self.downstream.startswith(("http://", "https://")):
            raise ConfigurationError("api.downstream must be an http(s) URL", field="api")
        if self.chain_id is not None and (
            isinstance(self.chain_id, bool) or not isinstance(self.chain_id, int)
        ):
            raise ConfigurationError("api.chain_id must be an integer", field="api")
        if not isinstance(self.allow_blind_signing, bool):
            raise ConfigurationError("api.allow_blind_signing must be true or false", field="api")
        for name in ("clients_file", "policy_file", "audit_log"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigurationError(f"api.{name} must be a file path", field="api")
        if self.mqtt is not None:
            self._check_mqtt()

    def _check_nonces(self) -> None:
        capacity = self.nonce_capacity
        if (
            isinstance(capacity, bool)
            or not isinstance(capacity, int)
            or not 1 <= capacity <= MAX_NONCE_CAPACITY
        ):
            raise ConfigurationError(
                f"api.nonce_capacity must be an integer in 1..{MAX_NONCE_CAPACITY}", field="api"
            )
        quota = self.nonce_quota
        if quota is not None and (
            isinstance(quota, bool) or not isinstance(quota, int) or not 1 <= quota <= capacity
        ):
            raise ConfigurationError(
                "api.nonce_quota must be an integer in 1..nonce_capacity", field="api"
            )

    def _check_mqtt(self) -> None:
        def refuse(message: str) -> ConfigurationError:
            return ConfigurationError(f"api.{message}", field="api")

        for name in ("mqtt_max_pending", "mqtt_keepalive", "mqtt_reconnect_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise refuse(f"{name} must be a positive integer")
        if (
            isinstance(self.mqtt_duplicate_answers, bool)
            or not isinstance(self.mqtt_duplicate_answers, int)
            or self.mqtt_duplicate_answers < 0
        ):
            raise refuse("mqtt_duplicate_answers must be an integer >= 0")
        window = self.mqtt_duplicate_window
        if (
            isinstance(window, bool)
            or not isinstance(window, int | float)
            or not math.isfinite(window)
            or window < 0
        ):
            raise refuse("mqtt_duplicate_window must be a number of seconds >= 0")
        if (
            isinstance(self.mqtt_reconnect_max, bool)
            or not isinstance(self.mqtt_reconnect_max, int)
            or self.mqtt_reconnect_max < self.mqtt_reconnect_min
        ):
            raise refuse("mqtt_reconnect_max must be an integer >= mqtt_reconnect_min")
        if not isinstance(self.mqtt_allow_plaintext, bool):
            raise refuse("mqtt_allow_plaintext must be true or false")
        if not self.mqtt_address()[2] and (self.mqtt_cert or self.mqtt_ca):
            raise refuse("mqtt_ca and mqtt_cert need an mqtts:// broker")
        if (self.mqtt_cert is None) != (self.mqtt_key is None):
            raise refuse("mqtt_cert and mqtt_key go together")
        for name in ("mqtt_ca", "mqtt_cert", "mqtt_key"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise refuse(f"{name} must be a file path")
        if not isinstance(self.mqtt_client_id, str) or len(self.mqtt_client_id) > 128:
            raise refuse("mqtt_client_id must be a string of at most 128 characters")
        try:
            topic_filter_levels(self.mqtt_request_topic)
        except (TypeError, ValueError, AttributeError):
            raise refuse("mqtt_request_topic is not a valid topic filter") from None
        reply = self.mqtt_reply_topic
        sample = reply.replace(MQTT_CLIENT, "client") if isinstance(reply, str) else None
        if not is_topic_name(sample) or "{" in str(sample) or "}" in str(sample):
            raise refuse("mqtt_reply_topic must be a topic name, with {client} at most")
        assert sample is not None
        if wildcard_levels(self.mqtt_request_topic, sample) is not None:
            raise refuse("mqtt_reply_topic must not match mqtt_request_topic")

    def mqtt_address(self) -> tuple[str, int, bool]:
        """The broker's host, port and whether to use TLS, from :attr:`mqtt`."""

        def refuse(message: str) -> ConfigurationError:
            return ConfigurationError(f"api.mqtt {message}", field="api")

        if not isinstance(self.mqtt, str):
            raise refuse("is not set")
        try:
            parts = urlsplit(self.mqtt)
            port = parts.port
        except ValueError:
            raise refuse("is not a valid URL") from None
        if parts.scheme not in MQTT_PORTS or not parts.hostname:
            raise refuse("must be mqtts://host[:port] (or mqtt:// for tests)")
        if parts.username is not None or parts.password is not None:
            raise refuse("must not hold credentials: signd authenticates with mqtt_cert")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise refuse("must be mqtts://host[:port], without a path")
        if parts.scheme == "mqtt" and not self.mqtt_allow_plaintext:
            raise refuse("is plaintext (mqtt://); use mqtts:// or set mqtt_allow_plaintext")
        return parts.hostname, port or MQTT_PORTS[parts.scheme], parts.scheme == "mqtts"

    def limits(self) -> Limits:
        """What of these settings the gate enforces (in this process or in the enclave)."""
        return Limits(
            self.max_batch,
            self.max_keys_per_request,
            self.allow_blind_signing,
            self.auth_failure_audit_rate,
            self.auth_failure_audit_burst,
            self.nonce_capacity,
            default_nonce_quota(self.nonce_capacity)
            if self.nonce_quota is None
            else self.nonce_quota,
        )

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], **overrides: Any) -> ApiSettings:
        """Settings from an ``[api]`` table, then ``overrides`` (``None`` values ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ConfigurationError(
                f"unknown settings in [api]: {', '.join(unknown)}", field="api"
            )
        values = dict(table)
        values.update({name: value for name, value in overrides.items() if value is not None})
        accounts = values.get("accounts", ())
        if not isinstance(accounts, list | tuple) or not all(isinstance(a, str) for a in accounts):
            raise ConfigurationError("api.accounts must be a list of strings", field="api")
        values["accounts"] = tuple(accounts)
        return cls(**values)
