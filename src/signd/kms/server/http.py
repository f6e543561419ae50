"""The HTTP face of the server: AWS KMS's JSON 1.1 protocol on 127.0.0.1.

``POST /`` with ``X-Amz-Target: TrentService.<Operation>`` and a SigV4-signed JSON body; the
answer is JSON with ``Content-Type: application/x-amz-json-1.1``, errors as
``{"__type": ..., "message": ...}``. Bodies over :data:`MAX_BODY_SIZE` are refused before they
are read (413). Nothing a client sends yields a 500: an unexpected failure is logged by type
only and answered as ``KMSInternalException``.

:func:`start_kms_server` runs a server in a background thread; :func:`start_kms_server_process`
runs ``python -m signd.kms.server`` as a child process. Both return a :class:`RunningServer`
and write ``kms-server.json`` (mode 0600) into the home directory so scripts can find it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from cryptography import x509

from signd.attestation import aws_nitro_root_certificate, load_dev_root
from signd.crypto.secret import Secret
from signd.errors import ConfigurationError
from signd.kms.server.errors import KmsApiError, serialization
from signd.kms.server.service import KmsService
from signd.kms.server.sigv4 import AccessKey, verify_request
from signd.kms.server.store import KeyStore, read_private_file, write_private_file
from signd.secrets import environment_only

logger = logging.getLogger(__name__)

MAX_BODY_SIZE: Final = 64 * 1024
TARGET_PREFIX: Final = "TrentService."
CONTENT_TYPE: Final = "application/x-amz-json-1.1"
DEFAULT_REGION: Final = "us-east-1"
DEFAULT_ACCOUNT: Final = "111122223333"
INFO_FILE: Final = "kms-server.json"
SERVER_NAME: Final = "signd-kms-server"
"""The ``Server`` header of every answer, by which a client tells a kms-server from another
program that took the port of one that stopped."""
STATE_DIRECTORY: Final = "kms-server"
DEFAULT_DEV_CA: Final = Path("attestation") / "dev-ca"
"""Where, under the home, the simulated NSM's development CA lives by default."""
_IDLE_TIMEOUT: Final = 30.0


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """Where a running kms-server listens and the credentials to sign requests with."""

    endpoint: str
    region: str
    access_key_id: str
    secret_access_key: Secret

    def to_json(self) -> str:
        return json.dumps(
            {
                "endpoint": self.endpoint,
                "region": self.region,
                "access_key_id": self.access_key_id,
                "secret_access_key": self.secret_access_key.reveal(),
            },
            indent=2,
        )

    @classmethod
    def read(cls, home: Path) -> ServerInfo:
        """The ``kms-server.json`` a server wrote into ``home``."""
        path = Path(home) / INFO_FILE
        try:
            document = json.loads(read_private_file(path))
            return cls(
                str(document["endpoint"]),
                str(document["region"]),
                str(document["access_key_id"]),
                Secret(str(document["secret_access_key"])),
            )
        except (ValueError, KeyError, TypeError):
            raise ConfigurationError(f"kms-server: {path} is malformed") from None

    def client(self, **kwargs: Any) -> Any:
        """A boto3 KMS client for this server."""
        import boto3

        return boto3.session.Session().client(
            "kms",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=str(self.secret_access_key.reveal()),
            **kwargs,
        )


class AttestationRoots:
    """The trust anchors for ``Recipient`` documents; the dev root is loaded when it appears."""

    def __init__(
        self,
        *,
        dev_ca_dir: Path | None,
        trust_aws_root: bool,
        extra: Sequence[x509.Certificate] = (),
    ) -> None:
        self._dev_ca_dir = dev_ca_dir
        self._fixed = [*extra, *([aws_nitro_root_certificate()] if trust_aws_root else [])]
        self._dev_root: x509.Certificate | None = None

    def __call__(self) -> list[x509.Certificate]:
        if self._dev_root is None and self._dev_ca_dir is not None:
            with contextlib.suppress(ConfigurationError):
                self._dev_root = load_dev_root(self._dev_ca_dir)
        return [*self._fixed, *([self._dev_root] if self._dev_root is not None else [])]


class _KmsHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], service: KmsService, access_key: AccessKey):
        super().__init__(address, _Handler)
        self.service = service
        self.access_keys = {access_key.access_key_id: access_key}
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def track(self, connection: socket.socket, active: bool) -> None:
        with self._connections_lock:
            if active:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    sys_version = ""
    timeout = _IDLE_TIMEOUT
    server: _KmsHttpServer

    def version_string(self) -> str:
        return SERVER_NAME

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.track(self.connection, True)

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            # The client left (its timeout) while its request was read or answered: nothing
            # to answer, and no traceback in the log for it.
            logger.debug("kms-server: the client left before its answer")

    def finish(self) -> None:
        try:
            super().finish()
        except (BrokenPipeError, ConnectionResetError):
            pass  # flushing the answer to a client that left
        finally:
            self.server.track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def do_POST(self) -> None:
        try:
            status, body = self._serve()
        except KmsApiError as exc:
            status, body = exc.status, exc.to_body()
        except Exception as exc:
            logger.error("kms-server: unexpected %s", type(exc).__name__)
            status, body = 500, {"__type": "KMSInternalException", "message": "internal error"}
        self._respond(status, body)

    def do_GET(self) -> None:
        self._refuse()

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET  # noqa: N815

    def _refuse(self) -> None:
        self.close_connection = True
        self._respond(
            400, {"__type": "UnknownOperationException", "message": "use POST / with X-Amz-Target"}
        )

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise KmsApiError("LengthRequiredException", "send a Content-Length", status=411)
        try:
            size = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise KmsApiError(
                "LengthRequiredException", "send a Content-Length", status=411
            ) from None
        if size < 0:
            self.close_connection = True
            raise serialization("Content-Length must not be negative")
        if size > MAX_BODY_SIZE:
            self.close_connection = True
            raise KmsApiError(
                "RequestEntityTooLargeException",
                f"request body is larger than {MAX_BODY_SIZE} bytes",
                status=413,
            )
        body = self.rfile.read(size)
        if len(body) != size:
            self.close_connection = True
            raise serialization("request body ended early")
        return body

    def _serve(self) -> tuple[int, dict[str, Any]]:
        body = self._read_body()
        url = urlsplit(self.path)
        target = self.headers.get("X-Amz-Target", "")
        operation = target.removeprefix(TARGET_PREFIX)
        if url.path != "/" or not target.startswith(TARGET_PREFIX):
            raise KmsApiError("UnknownOperationException", "use POST / with X-Amz-Target")
        headers = {
            name.lower(): ",".join(self.headers.get_all(name) or []) for name in self.headers
        }
        caller = verify_request(
            method="POST",
            path=url.path,
            query=url.query,
            headers=headers,
            body=body,
            access_keys=self.server.access_keys,
            region=self.server.service.region,
        )
        if operation not in self.server.service.operations:
            raise KmsApiError("UnknownOperationException", f"unknown operation {operation[:64]}")
        try:
            request = json.loads(body) if body.strip() else {}
        except (ValueError, RecursionError):
            raise serialization("request body is not valid JSON") from None
        if not isinstance(request, dict):
            raise serialization("request body must be a JSON object")
        return 200, self.server.service.handle(operation, request, caller)

    def _respond(self, status: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)


class RunningServer:
    """A kms-server started by this process: in a thread, or as a child process."""

    def __init__(
        self,
        info: ServerInfo,
        *,
        server: _KmsHttpServer | None = None,
        thread: threading.Thread | None = None,
        process: subprocess.Popen[bytes] | None = None,
    ) -> None:
        self.info = info
        self._server = server
        self._thread = thread
        self._process = process

    @property
    def endpoint(self) -> str:
        return self.info.endpoint

    @property
    def region(self) -> str:
        return self.info.region

    @property
    def credentials(self) -> tuple[str, Secret]:
        """``(access_key_id, secret_access_key)``."""
        return self.info.access_key_id, self.info.secret_access_key

    def client(self, **kwargs: Any) -> Any:
        return self.info.client(**kwargs)

    def __repr__(self) -> str:
        kind = "process" if self._process is not None else "thread"
        return f"RunningServer(endpoint={self.endpoint!r}, {kind})"

    def stop(self) -> None:
        """Stop serving and close every connection; safe to call twice."""
        if self._server is not None:
            self._server.shutdown()
            self._server.close_connections()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
            self._process = None

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def create_server(
    home: Path,
    *,
    port: int = 0,
    region: str = DEFAULT_REGION,
    account: str = DEFAULT_ACCOUNT,
    dev_ca_dir: Path | None = None,
    trust_aws_root: bool = False,
    extra_roots: Iterable[x509.Certificate] = (),
) -> tuple[_KmsHttpServer, ServerInfo]:
    """Bind a server on 127.0.0.1:``port`` over the state in ``home``, and write its info file."""
    home = Path(home)
    store = KeyStore(home / STATE_DIRECTORY)
    access_key = store.access_key(account)
    roots = AttestationRoots(
        dev_ca_dir=dev_ca_dir if dev_ca_dir is not None else home / DEFAULT_DEV_CA,
        trust_aws_root=trust_aws_root,
        extra=list(extra_roots),
    )
    service = KmsService(store, region=region, account=account, attestation_roots=roots)
    try:
        server = _KmsHttpServer(("127.0.0.1", port), service, access_key)
    except OSError as exc:
        raise ConfigurationError(
            f"kms-server: cannot listen on 127.0.0.1:{port}: {exc.strerror}"
        ) from None
    info = ServerInfo(
        endpoint=f"http://127.0.0.1:{server.server_address[1]}",
        region=region,
        access_key_id=access_key.access_key_id,
        secret_access_key=access_key.secret_access_key,
    )
    write_private_file(home / INFO_FILE, info.to_json().encode())
    return server, info


def start_kms_server(home: Path, port: int = 0, **options: Any) -> RunningServer:
    """Serve in a background thread of this process (tests, the embedded default)."""
    server, info = create_server(home, port=port, **options)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="kms-server", daemon=True
    )
    thread.start()
    return RunningServer(info, server=server, thread=thread)


CHILD_ENVIRONMENT: Final = frozenset({"PATH", "HOME", "LANG", "TZ", "TMPDIR", "LD_LIBRARY_PATH"})
CHILD_ENVIRONMENT_PREFIXES: Final = ("LC_", "PYTHON")
"""All of the parent's environment a kms-server child gets: the interpreter's variables and
what the dynamic loader needs to start it (an interpreter built with a shared libpython
outside the system's library path), the locale, the time zone and where temporary files
go. It reads no variable of signd's or AWS's
(its home and port are arguments), so secrets in the parent's environment, whatever their
names (``SIGND_HSM_PIN``, the variable ``[hsm] pin = "env:NAME"`` names, a passphrase, AWS
credentials), stay out of its ``/proc/<pid>/environ``."""


def start_kms_server_process(
    home: Path, port: int = 0, *, timeout: float = 30.0, extra_args: Sequence[str] = ()
) -> RunningServer:
    """Run ``python -m signd.kms.server`` as a child with only :data:`CHILD_ENVIRONMENT`;
    wait until it has written its info file."""
    home = Path(home)
    info_path = home / INFO_FILE
    info_path.unlink(missing_ok=True)
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    command = [sys.executable, "-m", "signd.kms.server", "--home", str(home), "--port", str(port)]
    process = subprocess.Popen(
        [*command, *extra_args],
        stdin=subprocess.DEVNULL,
        env=environment_only(CHILD_ENVIRONMENT, CHILD_ENVIRONMENT_PREFIXES),
    )
    running = RunningServer(ServerInfo("", "", "", Secret("")), process=process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            running.stop()
            raise ConfigurationError(f"kms-server exited with status {process.returncode}")
        if info_path.exists():
            try:
                running.info = ServerInfo.read(home)
            except ConfigurationError:
                time.sleep(0.05)
                continue
            if answers(running.info.endpoint):
                return running
        time.sleep(0.05)
    running.stop()
    raise ConfigurationError(f"kms-server did not start within {timeout} s")


def answers(endpoint: str, timeout: float = 1.0) -> bool:
    """Whether a kms-server is at ``endpoint`` (``http://host:port``).

    Accepting connections is not enough: once a kms-server stops, any program may listen on
    its port. A ``GET /`` is refused by the kms-server, with its :data:`SERVER_NAME` header;
    an answer without it is another program's. A connection accepted but not answered within
    ``timeout`` counts as a kms-server that is stuck, not gone: starting another would put a
    second server over the same state.
    """
    address = urlsplit(endpoint)
    connection = http.client.HTTPConnection(
        address.hostname or "", address.port or 0, timeout=timeout
    )
    try:
        connection.connect()
        try:
            connection.request("GET", "/")
            return from_kms_server(connection.getresponse().getheader("Server"))
        except TimeoutError:
            return True  # accepted but not answered in time: stuck, not gone
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def from_kms_server(server_header: str | None) -> bool:
    """Whether an answer's ``Server`` header says a kms-server sent it."""
    return server_header is not None and server_header.strip() == SERVER_NAME


def serve_until_signalled(server: _KmsHttpServer, stop: threading.Event) -> None:
    """Serve until ``stop`` is set (SIGTERM/SIGINT in the CLI), then close everything."""
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
    )
    thread.start()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.shutdown()
        server.close_connections()
        server.server_close()
        thread.join(timeout=10)
