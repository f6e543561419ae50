"""``signd serve``: the REST API and Ethereum JSON-RPC over HTTP, with uvicorn; with
``--mqtt``, also signing requests from an MQTT broker (over TLS).

Embedded defaults: the local enclave process (started on first use), SQLite metadata and
filesystem blobs under the home folder, the keystore passphrase from
``SIGND_KEYSTORE_PASSPHRASE``, a file, or a prompt at start-up. Settings come from the
``[api]`` table of ``signd.toml``; the options here override it.

Every request is authenticated and every key and signing call passes the gate (clients
file, policy, audit log): the enclave's (:class:`~signd.api.enclave_gatekeeper.EnclaveGatekeeper`)
whenever enclave custody is enabled, as it is by default (the embedded local enclave), else
the in-process :class:`~signd.gate.Gatekeeper`; the banner and the log say which. On first run
with the default paths, a development client and policy are written (and announced loudly).
SIGHUP reloads the clients and policy files, both or neither: a bad file is refused and the
files in force stay (``/readyz`` says so under ``reload``).
"""

from __future__ import annotations

import json
import logging
import queue
import resource
import signal
import socket
import stat
import sys
import threading
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, ClassVar

import typer

from signd.cli.context import state
from signd.cli.output import handles_errors, stderr
from signd.errors import DependencyUnavailable

if TYPE_CHECKING:
    from pathlib import Path

    import uvicorn

    from signd.api.gatekeeping import Keeper
    from signd.api.middleware import RequestsInFlight
    from signd.api.mqtt import MqttAdapter
    from signd.api.settings import ApiSettings
    from signd.config import Settings
    from signd.gate import DevDefaults, GatePaths
    from signd.operations import Signer

ACCESS_LOGGER = "signd.api.access"
STARTUP_FAILURE = 3
"""The exit status when the server could not start (uvicorn's)."""
SHUTDOWN_GRACE = 10
"""Seconds the requests in flight at SIGTERM/SIGINT get to finish; those still running then are
answered 503 ``dependency_unavailable`` (what they asked may have been done: the audit log
says)."""
SHUTDOWN_ANSWER_TIME = 5
"""Seconds those 503s get to go out before uvicorn cancels whatever is left."""


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line; access lines are JSON already and pass through."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == ACCESS_LOGGER:
            return record.getMessage()
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(line)


def configure_logging(level: str) -> None:
    """JSON lines on stderr for every logger, uvicorn's too; access lines are batched (each
    written within 50 ms, all at exit; see :class:`~signd.api.middleware.BatchingLogHandler`).

    The lines carry no caller, thread or process, so records do not collect them (the
    optimisations the logging HOWTO lists): that is most of a record's cost.
    """
    from signd.api.middleware import BatchingLogHandler

    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BatchingLogHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    for previous in root.handlers:
        if isinstance(previous, BatchingLogHandler):
            previous.close()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


@dataclass(frozen=True, slots=True)
class OpenGate:
    """The gatekeeper ``signd serve`` runs, where it runs, and the files it was given."""

    gatekeeper: Keeper
    in_enclave: bool
    paths: GatePaths
    clients_sha256: str
    policy_sha256: str
    created: DevDefaults | None

    @property
    def where(self) -> str:
        return (
            "in the enclave (authentication, policy and audit sealing)"
            if self.in_enclave
            else "in this process (no enclave custody is enabled)"
        )


def _banner(host: str, port: int, settings: ApiSettings, gate: OpenGate) -> None:
    from signd.client import url_without_secrets

    base = f"http://{host}:{port}"
    downstream, blind = settings.downstream, settings.allow_blind_signing
    lines = [
        f"signd serving on {base}  (REST under /v1, Ethereum JSON-RPC at / and /rpc)",
        "  every request is authenticated (request signature or bearer token) and checked",
        f"  gate: {gate.where}",
        f"  clients: {gate.paths.clients_file} (sha256 {gate.clients_sha256})",
        f"  policy:  {gate.paths.policy_file} (sha256 {gate.policy_sha256})"
        "   reload: kill -HUP <pid>",
        f"  JSON-RPC URL: {base}/rpc (bearer-token clients: Authorization: Bearer <token>)",
        f"  API description: {base}/openapi.json   health: {base}/readyz",
        f"  downstream node: {url_without_secrets(downstream) if downstream else 'none'}",
        f"  blind signing (POST /v1/sign/hash): {'ENABLED' if blind else 'disabled'}"
        " on this server; the policy decides per client",
    ]
    if settings.mqtt is not None:
        lines.insert(
            6,
            f"  MQTT broker: {url_without_secrets(settings.mqtt)}, requests on "
            f"{settings.mqtt_request_topic}, replies on {settings.mqtt_reply_topic}",
        )
    stderr.print("\n".join(lines), markup=False, highlight=False)


def dev_client_usage(
    base: str, client_id: str, key: Path, *, created: bool, blind_served: bool
) -> str:
    """How to call signd as the development client: the CLI and Python (curl cannot sign).
    ``blind_served``: whether this server serves raw-hash signing at all (the development
    policy allows it the client either way)."""
    from signd.gate.setup import DEV_CHAIN_IDS

    chain_ids = ", ".join(str(c) for c in DEV_CHAIN_IDS)
    rule = "!" * 78
    return "\n".join(
        [
            rule,
            "!! DEVELOPMENT CLIENT AND POLICY"
            + (" (written now, on first run)" if created else " in use"),
            f"!! client {client_id!r} may do EVERYTHING on chain ids {chain_ids},",
            "!! and BLIND SIGNING (raw hashes) IS ON for it. Not for production:"
            if blind_served
            else "!! and its policy allows BLIND SIGNING (raw hashes), which this server refuses"
            " unless started with --allow-blind-signing. Not for production:",
            "!! replace clients.toml and policy.toml (docs/POLICY.md), then kill -HUP signd.",
            rule,
            f"  private key: {key} (0600)",
            "  curl cannot call signd: each request carries a signature over its method, path,",
            "  body, time and a nonce. Use the CLI or the Python client:",
            f"    signd --url {base} --client-id {client_id} --client-key {key} \\",
            "      keys new --custody enclave",
            f"    export SIGND_URL={base} SIGND_CLIENT_ID={client_id} SIGND_CLIENT_KEY={key}",
            "    signd keys list --custody enclave; signd sign eth-message --key 0x... --text hi",
            "  Python:",
            "    from signd.client import SigndClient",
            f"    client = SigndClient({base!r}, {client_id!r}, {str(key)!r})",
            '    key = client.create_keys(chain="ethereum", custody="enclave")[0]',
            '    client.sign_eth_message(key.address, b"hello")',
        ]
    )


def open_gate(settings: Settings, api_settings: ApiSettings, signer: Signer) -> OpenGate:
    """The gatekeeper over ``signer``, writing the development defaults on first run: the
    enclave's when enclave custody is enabled, else one in this process."""
    from signd.api.enclave_gatekeeper import EnclaveGatekeeper
    from signd.custody.enclave import EnclaveBackend
    from signd.gate import GatePaths, open_gatekeeper, write_dev_defaults

    paths = GatePaths.under(
        settings.home,
        clients_file=api_settings.clients_file,
        policy_file=api_settings.policy_file,
        audit_log=api_settings.audit_log,
    )
    created = None
    if api_settings.clients_file is None and api_settings.policy_file is None:
        created = write_dev_defaults(settings.home, paths)
    limits = api_settings.limits()
    if "enclave" not in signer.custody_types:
        gatekeeper = open_gatekeeper(signer, paths, limits=limits)
        assert gatekeeper.clients is not None
        assert gatekeeper.policy is not None
        clients_sha256, policy_sha256 = gatekeeper.clients.sha256, gatekeeper.policy.sha256
        logging.getLogger("signd.serve").info("gate: in this process (no enclave custody)")
        return OpenGate(gatekeeper, False, paths, clients_sha256, policy_sha256, created)
    backend = signer.backend("enclave")
    assert isinstance(backend, EnclaveBackend)
    enclave_gatekeeper = EnclaveGatekeeper(
        backend.client, signer, paths, node=socket.gethostname(), limits=limits
    )
    try:
        enclave_gatekeeper.configure()
    except BaseException:
        enclave_gatekeeper.close()
        raise
    logging.getLogger("signd.serve").info(
        "gate: in the enclave (authentication, policy and audit sealing)"
    )
    if not backend.client.gate_only():
        logging.getLogger("signd.serve").warning(
            "the enclave also makes and signs with sealed keys outside its gate: a compromised"
            " host could sign what the policy refuses. Run it with [enclave] gate_only = true"
            " (signd enclave --gate-only)"
        )
    return OpenGate(
        enclave_gatekeeper,
        True,
        paths,
        enclave_gatekeeper.clients_sha256,
        enclave_gatekeeper.policy_sha256,
        created,
    )


class SighupReloads:
    """Reloads the gate's clients and policy files on SIGHUP, in a thread of its own.

    The signal handler only queues the request (:meth:`queue.SimpleQueue.put` is reentrant),
    so a signal never runs a reload inside another one that holds the files' lock (a
    deadlock: a burst of SIGHUPs used to hang the service) nor blocks the event loop while
    the enclave takes its time. Signals that arrive during a reload are answered by one more
    reload after it, which reads the files as they are then.
    """

    STOP_TIMEOUT: ClassVar[float] = 30.0
    """Seconds :meth:`stop` waits for a reload under way (an enclave answers within 15 s)."""

    def __init__(self, gatekeeper: Keeper) -> None:
        self._gatekeeper = gatekeeper
        self._asked: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="signd-reload", daemon=True)

    def start(self) -> None:
        """Reload on every SIGHUP from now on."""
        self._thread.start()
        signal.signal(signal.SIGHUP, self._on_sighup)

    def stop(self) -> None:
        """Ignore SIGHUP, and end the thread once the reload under way (if any) is over."""
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self._asked.put(False)
        self._thread.join(self.STOP_TIMEOUT)

    def _on_sighup(self, signum: int, frame: object) -> None:
        self._asked.put(True)

    def _run(self) -> None:
        while self._asked.get():
            if not self._drain():
                return
            self._reload()

    def _drain(self) -> bool:
        """Take the requests queued meanwhile (one reload answers them all); ``False`` once
        asked to stop."""
        while True:
            try:
                if not self._asked.get_nowait():
                    return False
            except queue.Empty:
                return True

    def _reload(self) -> None:
        log = logging.getLogger("signd.serve")
        try:
            refusal = self._gatekeeper.reload()
        except Exception:  # the thread must outlive any failure, or later SIGHUPs do nothing
            log.exception("reload failed, the files in force stay")
            return
        if refusal is not None:
            log.error(
                "reload refused, the files in force stay (neither file was taken): %s",
                refusal.reason,
            )
        else:
            log.info("reloaded the clients and policy files")


def _after_shutdown(signum: int, frame: object) -> None:
    """Ignore the signal uvicorn raises again once it has shut down."""


def _server(
    config: uvicorn.Config, adapter: MqttAdapter | None, requests: RequestsInFlight
) -> uvicorn.Server:
    """uvicorn's server, which freezes what start-up made out of the garbage collector's way
    once the app's lifespan has started (:func:`~signd.memory.freeze_startup_objects`), and
    at shutdown stops the ``requests`` still in flight after :data:`SHUTDOWN_GRACE` seconds
    (the app answers them 503); with an MQTT adapter, it also runs that between start-up and
    shutdown (it stops taking requests when uvicorn is told to exit, answers those in hand,
    then HTTP shuts down)."""
    import asyncio

    import anyio
    import uvicorn

    from signd.memory import freeze_startup_objects

    def stop_requests() -> None:
        logging.getLogger("signd.serve").warning(
            "stopping %d request(s) still running %g s into the shutdown (answered 503)",
            requests.stop_all(),
            SHUTDOWN_GRACE,
        )

    class SigndServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            freeze_startup_objects()

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            stopping = asyncio.get_running_loop().call_later(SHUTDOWN_GRACE, stop_requests)
            try:
                await super().shutdown(sockets)
            finally:
                stopping.cancel()

    if adapter is None:
        return SigndServer(config)
    mqtt_adapter = adapter

    class ServerWithMqtt(SigndServer):
        async def main_loop(self) -> None:
            async with anyio.create_task_group() as group:
                group.start_soon(mqtt_adapter.run)
                try:
                    await super().main_loop()
                finally:
                    mqtt_adapter.stop()

    return ServerWithMqtt(config)


def _warn_if_home_is_open(home: Path) -> None:
    """The home holds the audit log, the gate's clients and policy files and the key records:
    warn when group or others may read or enter it (signd makes a home 0700, but leaves the
    mode of one that exists alone)."""
    try:
        mode = stat.S_IMODE(home.stat().st_mode)
    except OSError:
        return
    if mode & 0o077:
        logging.getLogger("signd.serve").warning(
            "the home %s is open to group or others (mode %o): run chmod 700 %s",  # safe: a path
            home,
            mode,
            home,
        )


OTHER_DESCRIPTORS = 256
"""File descriptors ``signd serve`` keeps for other than its HTTP connections (the audit log,
SQLite, blob files, the enclave, KMS, S3, PostgreSQL and MQTT connections)."""


def _open_files_for(max_connections: int) -> None:
    """Raise the soft limit on open files (up to the hard one) to ``max_connections`` and
    :data:`OTHER_DESCRIPTORS`; warn when even the hard limit is lower. Under a soft limit of
    1024 (systemd's default) 1,000 open connections used every descriptor: new connections
    were reset rather than answered 503, and nothing could reach the enclave, a database or
    a file."""
    wanted = max_connections + OTHER_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if raised > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft != resource.RLIM_INFINITY and soft < wanted:
        logging.getLogger("signd.serve").warning(
            "at most %d files may be open (RLIMIT_NOFILE), fewer than max_connections (%d)"
            " and %d more: raise the limit (systemd LimitNOFILE=, ulimit -n) or lower"
            " max_connections",
            soft,
            max_connections,
            OTHER_DESCRIPTORS,
        )


@handles_errors
def _keystore_only_with_passphrase(settings: Settings, signer: Signer) -> None:
    """With the embedded defaults (no ``custody.enabled``), a service that has no way to get
    the keystore passphrase serves without keystore custody rather than failing to start."""
    from signd.operations.backends import keystore_passphrase_available

    if (
        "keystore" in signer.custody_types
        and not settings.section("custody").get("enabled")
        and not keystore_passphrase_available(settings)
    ):
        signer.disable("keystore")
        logging.getLogger("signd.serve").warning(
            "keystore custody is off: no passphrase (set SIGND_KEYSTORE_PASSPHRASE or "
            "[keystore] passphrase_file to enable it)"
        )


@handles_errors
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8645,
    downstream: Annotated[
        str | None,
        typer.Option(help="Ethereum node JSON-RPC URL: other methods are proxied to it."),
    ] = None,
    allow_blind_signing: Annotated[
        bool,
        typer.Option("--allow-blind-signing", help="Serve POST /v1/sign/hash (raw-hash signing)."),
    ] = False,
    mqtt: Annotated[
        str | None,
        typer.Option(help="MQTT broker, mqtts://host:port: also take signing requests from it."),
    ] = None,
    mqtt_ca: Annotated[
        str | None, typer.Option(help="PEM file of the CA that signs the broker's certificate.")
    ] = None,
    mqtt_cert: Annotated[
        str | None, typer.Option(help="PEM file of signd's MQTT client certificate.")
    ] = None,
    mqtt_key: Annotated[
        str | None, typer.Option(help="PEM file of the client certificate's private key.")
    ] = None,
    mqtt_request_topic: Annotated[
        str | None, typer.Option(help="Topic filter of requests [default: signd/requests/#].")
    ] = None,
    mqtt_allow_plaintext: Annotated[
        bool,
        typer.Option("--mqtt-allow-plaintext", help="Allow mqtt:// without TLS (tests only)."),
    ] = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the REST API and Ethereum JSON-RPC service (and the MQTT adapter with --mqtt)
    until SIGINT or SIGTERM."""
    import uvicorn

    from signd.api import ApiSettings, create_app
    from signd.api.gatekeeping import GatekeeperGate, gatekeeper_authenticator
    from signd.auth import ClientsRegistry
    from signd.errors import UnsupportedOperation
    from signd.gate.setup import DEV_CLIENT_ID, DEV_CLIENT_KEY
    from signd.operations.attestation import enclave_attestor

    if state.url is not None:
        raise UnsupportedOperation("signd serve opens custody itself; drop --url / SIGND_URL")
    configure_logging(log_level)
    state.gate_only_enclave = True
    state.take_keystore_passphrase_from_environment = True
    settings = state.settings
    _warn_if_home_is_open(settings.home)
    api_settings = ApiSettings.from_mapping(
        settings.section("api"),
        downstream=downstream,
        allow_blind_signing=True if allow_blind_signing else None,
        mqtt=mqtt,
        mqtt_ca=mqtt_ca,
        mqtt_cert=mqtt_cert,
        mqtt_key=mqtt_key,
        mqtt_request_topic=mqtt_request_topic,
        mqtt_allow_plaintext=True if mqtt_allow_plaintext else None,
    )
    _open_files_for(api_settings.max_connections)
    signer = state.signer
    _keystore_only_with_passphrase(settings, signer)
    gatekeeper = None
    reloads = None
    try:
        for custody in signer.custody_types:
            try:
                signer.backend(custody)  # now, in the terminal: passphrase prompt, config errors
            except DependencyUnavailable as exc:
                logging.getLogger("signd.serve").warning(
                    "custody %s is unavailable (%s); /readyz will say so", custody, exc.message
                )
        gate = open_gate(settings, api_settings, signer)
        gatekeeper = gate.gatekeeper
        authenticate = gatekeeper_authenticator(gatekeeper, api_settings)
        app = create_app(
            signer,
            api_settings,
            authenticate=authenticate,
            gate=GatekeeperGate(gatekeeper),
            attestor=enclave_attestor(settings, signer),
        )
        adapter = None
        if api_settings.mqtt is not None:
            from signd.api.mqtt import MqttAdapter

            adapter = MqttAdapter(app.state.service, app.state.authenticate)
        _banner(host, port, api_settings, gate)
        dev_key = settings.home / DEV_CLIENT_KEY
        if dev_key.exists() and DEV_CLIENT_ID in ClientsRegistry.load(gate.paths.clients_file):
            usage = dev_client_usage(
                f"http://{host}:{port}",
                DEV_CLIENT_ID,
                dev_key,
                created=gate.created is not None,
                blind_served=api_settings.allow_blind_signing,
            )
            stderr.print(usage, markup=False, highlight=False)
        reloads = SighupReloads(gatekeeper)
        reloads.start()
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again with
        # the handlers it found; these make that a no-op, so that the signer is closed below
        # (the local enclave stopped, cached secrets dropped) and the exit status is 0.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _after_shutdown)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=SHUTDOWN_GRACE + SHUTDOWN_ANSWER_TIME,
            # uvicorn answers a request 503 when this many connections are open, counting the
            # one it came on: one more than max_connections serves max_connections at once.
            limit_concurrency=api_settings.max_connections + 1,
        )
        server = _server(config, adapter, app.state.requests)
        server.run()
        if not server.started:
            sys.exit(STARTUP_FAILURE)
    finally:
        if reloads is not None:
            reloads.stop()
        if gatekeeper is not None:
            gatekeeper.close()
        state.close()
