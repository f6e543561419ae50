"""``python -m signd.kms.server --home DIR --port PORT``: the server without the full CLI.

``--exit-with-parent`` stops the server when the process that started it goes away (it is
re-parented), so an auto-started server does not outlive an owner that was killed.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path

from signd.hardening import refuse_core_dumps_and_attach
from signd.kms.server.http import DEFAULT_REGION, create_server, serve_until_signalled


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m signd.kms.server")
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--region", default=DEFAULT_REGION)
    parser.add_argument("--dev-ca", type=Path, default=None)
    parser.add_argument("--trust-aws-root", action="store_true")
    parser.add_argument("--exit-with-parent", action="store_true")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    refuse_core_dumps_and_attach()  # before it reads its key material
    server, _ = create_server(
        arguments.home,
        port=arguments.port,
        region=arguments.region,
        dev_ca_dir=arguments.dev_ca,
        trust_aws_root=arguments.trust_aws_root,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    if arguments.exit_with_parent:
        threading.Thread(target=_watch_parent, args=(stop,), daemon=True).start()
    serve_until_signalled(server, stop)


def _watch_parent(stop: threading.Event, interval: float = 0.5) -> None:
    parent = os.getppid()
    while not stop.wait(interval):
        if os.getppid() != parent:
            stop.set()


if __name__ == "__main__":
    main()
