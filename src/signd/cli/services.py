"""Long-running processes: ``signd enclave`` (the trusted signer) and ``signd config check``."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from signd.cli.context import state
from signd.cli.output import emit, handles_errors, stdout
from signd.config import Settings, attestation_mode, config_flag, config_number, expand_home
from signd.errors import ConfigurationError, CustodyUnsupported, SigndError
from signd.kms.base import KmsClient
from signd.storage.base import BlobStore, MetadataStore

if TYPE_CHECKING:
    from signd.enclave.hsm import EnclaveHsm
    from signd.kms.recipient import Recipient

enclave_app = typer.Typer(help="The trusted signer process (the enclave side).")
config_app = typer.Typer(help="Check the configuration.", no_args_is_help=True)

DEFAULT_ENCLAVE_LISTEN = "unix://{home}/run/enclave.sock"


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@enclave_app.callback(invoke_without_command=True)
@handles_errors
def enclave(
    ctx: typer.Context,
    listen: Annotated[
        str | None,
        typer.Option(help="unix:///path or vsock://CID:PORT (default [enclave] listen)."),
    ] = None,
    exit_with_parent: Annotated[
        bool, typer.Option(help="Stop when the process that started this one exits.")
    ] = False,
    gate_only: Annotated[
        bool | None,
        typer.Option(
            "--gate-only/--allow-bare",
            help="Sign with the enclave's keys only through its gate (GATE), or also on the"
            " host's bare request (operator tools) [default: [enclave] gate_only, else"
            " gate-only].",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the enclave: it holds KMS access, unseals keys in its memory and signs."""
    if ctx.invoked_subcommand is not None:
        return
    from signd.enclave.cache import UnsealedKeyCache
    from signd.enclave.server import run_enclave
    from signd.hardening import refuse_core_dumps_and_attach
    from signd.memory import freeze_startup_objects
    from signd.operations.components import build_blob_store, build_kms
    from signd.operations.local_enclave import watch_parent

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = state.settings
    section = settings.section("enclave")
    address = expand_home(
        listen or str(section.get("listen", DEFAULT_ENCLAVE_LISTEN)), settings.home
    )
    if address.startswith("unix://"):
        Path(address.removeprefix("unix://")).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    cache = UnsealedKeyCache[Any, Any](
        max_age=config_number("enclave", section, "cache_max_age", 300.0),
        max_uses=int(config_number("enclave", section, "cache_max_uses", 1000)),
        max_entries=int(config_number("enclave", section, "cache_max_entries", 10_000)),
    )
    configured_gate_only = config_flag("enclave", section, "gate_only", True)
    stop = threading.Event()
    _stop_on_signals(stop)
    if exit_with_parent:
        watch_parent(stop)
    refuse_core_dumps_and_attach()  # before it holds any key or secret
    hsm = _enclave_hsm(settings)
    recipient = _enclave_recipient(settings)
    kms, blobs = build_kms(settings, recipient=recipient), build_blob_store(settings)
    attestation = recipient.provider if recipient is not None else None
    try:
        if hsm is not None:
            hsm.start()
        freeze_startup_objects()
        run_enclave(
            address,
            kms,
            blobs,
            stop=stop,
            cache=cache,
            hsm=hsm,
            attestation=attestation,
            gate_only=gate_only if gate_only is not None else configured_gate_only,
        )
    finally:
        kms.close()
        blobs.close()
        if hsm is not None:
            hsm.close()


DEFAULT_DEV_CA = "{home}/attestation/dev-ca"


def _enclave_recipient(settings: Settings) -> Recipient | None:
    """The enclave's attested RSA key for KMS's ``Recipient`` flow, per ``[enclave] attestation``.

    ``simulated`` (the local default): a simulated NSM signing with the development CA in
    ``[enclave] dev_ca`` (default ``{home}/attestation/dev-ca``, the one ``signd kms-server``
    trusts by default), PCR2 over the configuration file; ``nsm``: ``/dev/nsm`` on Nitro;
    ``off``: no attestation, so KMS must release plaintext data keys (development only).
    """
    from signd.attestation import NsmProvider, SimulatedNsm
    from signd.attestation.providers import AttestationProvider
    from signd.kms.recipient import Recipient

    section = settings.section("enclave")
    mode = attestation_mode(settings)
    if mode == "off":
        return None
    provider: AttestationProvider
    if mode == "nsm":
        provider = NsmProvider()
    else:
        config = settings.config_file.read_bytes() if settings.config_file.exists() else b""
        dev_ca = Path(expand_home(str(section.get("dev_ca", DEFAULT_DEV_CA)), settings.home))
        provider = SimulatedNsm(dev_ca, config=config)
    return Recipient(provider)


def _enclave_hsm(settings: Settings) -> EnclaveHsm | None:
    """HSM custody inside this enclave, when ``[hsm] in_enclave`` asks for it.

    The PIN is fetched here (``hsm.pin`` is a secret reference, e.g. ``aws-sm:...`` reached
    through the outbound proxy), when the token is first connected.
    """
    from signd.custody.hsm.settings import HsmSettings, hsm_in_enclave

    section = settings.section("hsm")
    if not section or not hsm_in_enclave(section):
        return None
    from signd.custody.hsm.token import HsmToken
    from signd.enclave.hsm import EnclaveHsm

    def connect() -> HsmToken:
        return HsmToken(HsmSettings.from_mapping(section))

    return EnclaveHsm(
        connect,
        retry_interval=config_number("hsm", section, "reconnect_interval", 1.0, allow_zero=True),
    )


def _unreachable(name: str, exc: SigndError) -> dict[str, str]:
    """A part that failed its probe: ``unsupported`` when it answered that it cannot serve
    signd (an HSM without secp256k1), else ``unreachable``."""
    status = "unsupported" if isinstance(exc, CustodyUnsupported) else "unreachable"
    return {"part": name, "status": status, "code": exc.code, "message": exc.message}


def _probe(name: str, check: Any) -> dict[str, str]:
    try:
        check()
    except SigndError as exc:
        return _unreachable(name, exc)
    return {"part": name, "status": "ok"}


@config_app.command("check")
@handles_errors
def config_check(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")] = False,
) -> None:
    """Validate the configuration and report which parts are reachable."""
    from signd.operations.components import build_blob_store, build_kms, build_metadata_store

    settings = state.settings
    parts: list[dict[str, str]] = []
    builders: dict[str, Callable[[Settings], KmsClient | BlobStore | MetadataStore]] = {
        "kms": build_kms,
        "blobs": build_blob_store,
        "metadata": build_metadata_store,
    }
    for name, build in builders.items():
        try:
            component = build(settings)
        except ConfigurationError as exc:
            parts.append({"part": name, "status": "invalid", "message": exc.message})
            continue
        except SigndError as exc:  # a store that connects when built (PostgreSQL) is down
            parts.append(_unreachable(name, exc))
            continue
        parts.append(_probe(name, component.check_health))
        component.close()
    signer = state.signer
    for custody in signer.custody_types:
        parts.append(
            _probe(f"custody:{custody}", lambda c=custody: signer.backend(c).check_health())
        )
    ok = all(part["status"] == "ok" for part in parts)
    result = {"config_file": str(settings.config_file), "ok": ok, "parts": parts}

    def human() -> None:
        stdout.print(f"config: {settings.config_file}")
        for part in parts:
            mark = "[green]ok[/green]" if part["status"] == "ok" else f"[red]{part['status']}[/red]"
            stdout.print(f"  {part['part']:<18} {mark} {part.get('message', '')}")

    emit(result, as_json=as_json, human=human)
    if not ok:
        raise typer.Exit(1)


proxy_app = typer.Typer(
    help="The outbound proxy: the enclave reaches KMS and storage only through the host.",
    no_args_is_help=True,
)


@proxy_app.command("host")
@handles_errors
def proxy_host(
    allowlist: Annotated[
        Path, typer.Option(help="YAML (vsock-proxy style) or TOML allowlist of host:port.")
    ],
    listen: Annotated[
        str, typer.Option(help="unix:///path or vsock://CID:PORT to accept enclave connections.")
    ] = "unix://{home}/run/proxy.sock",
) -> None:
    """On the host: forward allowlisted destinations for the enclave (like AWS vsock-proxy)."""
    from signd.proxy import Allowlist, run_host_proxy

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    address = expand_home(listen, state.settings.home)
    if address.startswith("unix://"):
        Path(address.removeprefix("unix://")).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    run_host_proxy(address, Allowlist.load(allowlist))


@proxy_app.command("enclave")
@handles_errors
def proxy_enclave(
    route: Annotated[
        list[str],
        typer.Option(help="LOCAL_PORT:HOST:PORT, e.g. 8443:kms.us-east-1.amazonaws.com:443."),
    ],
    proxy: Annotated[
        str, typer.Option(help="Where the host proxy listens: unix:///path or vsock://3:8000.")
    ] = "unix://{home}/run/proxy.sock",
) -> None:
    """Inside the enclave: local TCP listeners that tunnel to the host proxy (like socat)."""
    from signd.proxy import Route, run_enclave_forwarders

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    routes = [Route.parse(text) for text in route]
    run_enclave_forwarders(expand_home(proxy, state.settings.home), routes)


@enclave_app.command("measure")
@handles_errors
def enclave_measure(
    config: Annotated[
        Path | None, typer.Option(help="Enclave configuration file measured into PCR2.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")] = False,
) -> None:
    """Print PCR0 (enclave code), PCR1 (runtime) and PCR2 (configuration), SHA-384 each."""
    from signd.attestation import measure

    config_bytes = config.read_bytes() if config is not None else b""
    pcrs = {f"PCR{index}": value.hex() for index, value in measure(config_bytes).items()}
    emit(
        pcrs,
        as_json=as_json,
        human=lambda: stdout.print("\n".join(f"{name}: {value}" for name, value in pcrs.items())),
    )
