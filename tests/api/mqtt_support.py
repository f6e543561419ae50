"""Real MQTT for the adapter tests: a throwaway PKI, Mosquitto over TLS, and paho devices.

- :func:`make_pki` writes a CA, the broker's certificate (127.0.0.1 and localhost), client
  certificates for signd and for devices, and a client certificate from another CA.
- :class:`Broker` runs ``mosquitto -c`` on a free 127.0.0.1 port: TLS only, client
  certificates required, the certificate's CN as the user name; it can be restarted on the
  same port. A missing ``mosquitto`` skips the test, or fails it when ``CI`` is set.
- :class:`Device` is a paho client with its own certificate, subscribed to its reply topic.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import queue
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.fixtures.servers import _unavailable, free_port

WAIT = 15.0
"""Seconds any wait in these tests may take before it fails."""


@dataclass(frozen=True)
class Credential:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    broker: Credential
    signd: Credential
    devices: dict[str, Credential]
    rogue: Credential
    """A client certificate for ``device-1`` signed by a CA the broker does not trust."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


class _Authority:
    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(name)
        public = self.key.public_key()
        self.cert = (
            self._builder(self.name, public)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def _builder(self, subject: x509.Name, public: ec.EllipticCurvePublicKey) -> Any:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )

    def issue(self, directory: Path, common_name: str, *, server: bool = False) -> Credential:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            self._builder(_name(common_name), key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        else:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        credential = Credential(directory / f"{common_name}.pem", directory / f"{common_name}.key")
        credential.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(credential.key, key)
        return credential


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def make_pki(directory: Path, devices: tuple[str, ...] = ("device-1", "device-2")) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    authority = _Authority("signd test CA")
    ca = directory / "ca.pem"
    ca.write_bytes(authority.cert.public_bytes(serialization.Encoding.PEM))
    rogue_directory = directory / "rogue"
    rogue_directory.mkdir()
    return Pki(
        ca=ca,
        broker=authority.issue(directory, "broker", server=True),
        signd=authority.issue(directory, "signd"),
        devices={name: authority.issue(directory, name) for name in devices},
        rogue=_Authority("rogue CA").issue(rogue_directory, "device-1"),
    )


ACL = """\
user signd
topic read signd/requests/#
topic write signd/replies/#

pattern write signd/requests/%u
pattern read signd/replies/%u/#
"""
"""Who may do what: the user name is the client certificate's CN (docs/API.md)."""


class Broker:
    """``mosquitto -c mosquitto.conf`` on 127.0.0.1; stop/start keep the port."""

    def __init__(self, directory: Path, pki: Pki) -> None:
        executable = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
        )
        if executable is None:
            _unavailable("mosquitto is not installed (apt-get install mosquitto)")
        self.executable = executable
        self.port = free_port()
        self.log = directory / "mosquitto.log"
        self.conf = directory / "mosquitto.conf"
        acl = directory / "mosquitto.acl"
        acl.write_text(ACL)
        self.conf.write_text(
            "\n".join(
                [
                    "per_listener_settings false",
                    "persistence false",
                    "user root",
                    f"listener {self.port} 127.0.0.1",
                    f"cafile {pki.ca}",
                    f"certfile {pki.broker.cert}",
                    f"keyfile {pki.broker.key}",
                    "tls_version tlsv1.2",
                    "require_certificate true",
                    "use_identity_as_username true",
                    "allow_anonymous false",
                    f"acl_file {acl}",
                    "",
                ]
            )
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                [self.executable, "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
            )
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited:\n{self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen in {WAIT:g}s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"


@contextmanager
def running_broker(directory: Path, pki: Pki) -> Iterator[Broker]:
    directory.mkdir(parents=True, exist_ok=True)
    broker = Broker(directory, pki)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


class ConnectFailed(Exception):
    """The broker did not accept the device's connection."""


def client_context(ca: Path, credential: Credential | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if credential is not None:
        context.load_cert_chain(credential.cert, credential.key)
    return context


@dataclass
class Reply:
    topic: str
    body: dict[str, Any]
    correlation_data: bytes | None


class Device:
    """A paho client with a client certificate (or none), collecting what it receives."""

    def __init__(
        self,
        broker: Broker,
        pki: Pki,
        name: str,
        *,
        credential: Credential | None = None,
        with_certificate: bool = True,
        mqtt5: bool = False,
        auth: dict[str, str] | None = None,
    ) -> None:
        self.broker = broker
        self.auth = auth
        """Put in each JSON payload that has no ``auth`` of its own (e.g. a bearer token)."""
        self.name = name
        self.reply_topic = f"signd/replies/{name}"
        self.request_topic = f"signd/requests/{name}"
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{name}-{time.monotonic_ns()}",
            protocol=MQTTProtocolVersion.MQTTv5 if mqtt5 else MQTTProtocolVersion.MQTTv311,
        )
        if with_certificate:
            credential = credential or pki.devices[name]
        self.client.tls_set_context(client_context(pki.ca, credential))
        self.replies: queue.Queue[Reply] = queue.Queue()
        self._connected = threading.Event()
        self._ended = threading.Event()
        self._subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._ended.set()
        else:
            self._connected.set()

    def _on_disconnect(self, client: paho.Client, *args: Any) -> None:
        self._ended.set()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        properties = message.properties
        self.replies.put(
            Reply(
                message.topic,
                json.loads(message.payload),
                getattr(properties, "CorrelationData", None),
            )
        )

    def connect(self) -> Device:
        """Connect and subscribe to the reply topic; :class:`ConnectFailed` if refused."""
        try:
            self.client.connect("127.0.0.1", self.broker.port, keepalive=30)
        except OSError as exc:
            raise ConnectFailed(f"{type(exc).__name__}: {exc}") from exc
        self.client.loop_start()
        deadline = time.monotonic() + WAIT
        while not self._connected.is_set():
            if self._ended.is_set() or time.monotonic() > deadline:
                self.close()
                raise ConnectFailed("no successful CONNACK")
            time.sleep(0.02)
        self.client.subscribe(f"{self.reply_topic}/#", qos=1)
        if not self._subscribed.wait(WAIT):
            raise ConnectFailed("no SUBACK")
        return self

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def send(
        self,
        payload: dict[str, Any] | bytes,
        *,
        topic: str | None = None,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        user_properties: list[tuple[str, str]] | None = None,
        retain: bool = False,
    ) -> None:
        if isinstance(payload, dict) and self.auth is not None and "auth" not in payload:
            payload = payload | {"auth": self.auth}
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        properties = None
        if response_topic or correlation_data or user_properties:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic:
                properties.ResponseTopic = response_topic
            if correlation_data:
                properties.CorrelationData = correlation_data
            if user_properties:
                properties.UserProperty = user_properties
        info = self.client.publish(
            topic or self.request_topic, data, qos=1, retain=retain, properties=properties
        )
        info.wait_for_publish(WAIT)

    def receive(self, count: int = 1, timeout: float = WAIT) -> list[Reply]:
        """The next ``count`` replies; fails when they do not all come in time."""
        deadline = time.monotonic() + timeout
        received: list[Reply] = []
        while len(received) < count:
            try:
                received.append(self.replies.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(
                    f"{len(received)} of {count} replies in {timeout:g}s: {received}"
                ) from None
        return received

    def ask(self, payload: dict[str, Any] | bytes, **options: Any) -> Reply:
        self.send(payload, **options)
        (reply,) = self.receive()
        return reply


@contextmanager
def connected(device: Device) -> Iterator[Device]:
    device.connect()
    try:
        yield device
    finally:
        device.close()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {timeout:g}s")
        time.sleep(0.05)
