"""``signd serve``: the REST API and Ethereum JSON-RPC over HTTP, with uvicorn.

Embedded defaults: the local enclave process (started on first use), SQLite metadata and
filesystem blobs under the home folder, the keystore passphrase from
``SIGND_KEYSTORE_PASSPHRASE``, a file, or a prompt at start-up. Settings come from the
``[api]`` table of ``signd.toml``; the options here override it.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import traceback
from datetime import UTC, datetime
from typing import Annotated
from urllib.parse import urlsplit

import typer

from signd.cli.context import state
from signd.cli.output import handles_errors, stderr
from signd.errors import DependencyUnavailable

ACCESS_LOGGER = "signd.api.access"


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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def _without_secrets(url: str) -> str:
    """scheme://host:port of a URL: its path, query and user info may hold an API key."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


def _banner(host: str, port: int, downstream: str | None, blind: bool) -> None:
    base = f"http://{host}:{port}"
    lines = [
        f"signd serving on {base}  (REST under /v1, Ethereum JSON-RPC at / and /rpc)",
        f"  curl -s {base}/v1/keys?custody=keystore",
        f"  curl -s -X POST {base}/v1/keys -H 'content-type: application/json'"
        ' -d \'{"chain": "ethereum", "custody": "keystore"}\'',
        f"  JSON-RPC URL: {base}/rpc   e.g. Web3(Web3.HTTPProvider('{base}/rpc'))",
        f"  API description: {base}/openapi.json   health: {base}/readyz",
        f"  downstream node: {_without_secrets(downstream) if downstream else 'none'}",
        f"  blind signing (POST /v1/sign/hash): {'ENABLED' if blind else 'disabled'}",
    ]
    stderr.print("\n".join(lines), markup=False, highlight=False)


def _after_shutdown(signum: int, frame: object) -> None:
    """Ignore the signal uvicorn raises again once it has shut down."""


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
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the REST API and Ethereum JSON-RPC service until SIGINT or SIGTERM."""
    import uvicorn

    from signd.api import ApiSettings, create_app

    configure_logging(log_level)
    settings = state.settings
    api_settings = ApiSettings.from_mapping(
        settings.section("api"),
        downstream=downstream,
        allow_blind_signing=True if allow_blind_signing else None,
    )
    signer = state.signer
    try:
        for custody in signer.custody_types:
            try:
                signer.backend(custody)  # now, in the terminal: passphrase prompt, config errors
            except DependencyUnavailable as exc:
                logging.getLogger("signd.serve").warning(
                    "custody %s is unavailable (%s); /readyz will say so", custody, exc.message
                )
        app = create_app(signer, api_settings)
        _banner(host, port, api_settings.downstream, api_settings.allow_blind_signing)
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again with
        # the handlers it found; these make that a no-op, so that the signer is closed below
        # (the local enclave stopped, cached secrets dropped) and the exit status is 0.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _after_shutdown)
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=10,
        )
    finally:
        state.close()
