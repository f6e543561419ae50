"""Real processes for the end-to-end tests: ``signd serve`` and a hardhat node.

Both are context managers that wait (bounded) until the process answers and stop it on exit,
whatever happened in between.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.api.conftest import PASSPHRASE
from tests.fixtures.servers import _unavailable, free_port

E2E_DIR = Path(__file__).parent / "e2e"
STARTUP_TIMEOUT = 60.0

TEST_TOKEN = "signd-tests-bearer-token"
AUTH = {"authorization": f"Bearer {TEST_TOKEN}"}
"""``signd serve`` always authenticates: the processes these tests start register a bearer
client ``tests`` (every scope, every key) under a policy that allows it everything."""

TEST_CLIENTS = f"""\
version = 1

[[clients]]
id = "tests"
scopes = ["keys:create", "keys:read", "sign:hash", "sign:message", "sign:transaction"]
key_labels = ["*"]
token_sha256 = "{hashlib.sha256(TEST_TOKEN.encode()).hexdigest()}"
"""
TEST_POLICY = """\
version = 1

[[rules]]
name = "tests-everything"
clients = ["tests"]
key_labels = ["*"]
operations = ["keys:create", "sign:transaction", "sign:message"]
chains = ["ethereum"]
allow_contract_creation = true
contract_selectors = ["*"]

[[rules]]
name = "tests-typed-data"
clients = ["tests"]
key_labels = ["*"]
operations = ["sign:typed_data"]
chains = ["ethereum"]
eip712_domains = [{chainId = 1}, {chainId = 5}, {chainId = 31337}, {chainId = 11155111}]

[[rules]]
name = "tests-blind"
clients = ["tests"]
key_labels = ["*"]
operations = ["sign:hash"]
chains = ["ethereum"]
blind_signing = true
"""


def provision_test_client(home: Path) -> None:
    """The ``tests`` bearer client and its policy in ``home`` (kept when already there)."""
    home.mkdir(parents=True, exist_ok=True)
    for name, text in (("clients.toml", TEST_CLIENTS), ("policy.toml", TEST_POLICY)):
        if not (home / name).exists():
            (home / name).write_text(text)


# `signd serve` as the lead registers it in cli/main.py; registered here too until then.
SIGND_MAIN = """
from signd.cli.main import app
from signd.cli.serve import serve
if not any(c.name == "serve" or c.callback is serve for c in app.registered_commands):
    app.command("serve")(serve)
app(prog_name="signd")
"""


def rpc_call(url: str, method: str, params: list[Any], timeout: float = 10.0) -> Any:
    """One JSON-RPC call with the standard library; the whole answer object (with the test
    client's token, which a plain node ignores)."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    request = urllib.request.Request(url, body, {"content-type": "application/json", **AUTH})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _wait_until(ready: Any, process: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log.read_text()}")
        try:
            if ready():
                return
        except (OSError, urllib.error.URLError, ValueError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start in {STARTUP_TIMEOUT:g}s:\n{log.read_text()}")


def _stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@dataclass
class SigndProcess:
    url: str
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def rpc_url(self) -> str:
        return f"{self.url}/rpc"

    def stop(self) -> int:
        """SIGTERM (uvicorn's graceful shutdown); the exit status."""
        return _stop(self.process)


@contextmanager
def signd_serve(
    home: Path,
    *options: str,
    provision: bool = True,
    passphrase: bool = True,
    environment: Mapping[str, str] | None = None,
) -> Iterator[SigndProcess]:
    """``signd --home HOME serve --port FREE OPTIONS`` until the block ends; with
    ``provision``, the ``tests`` bearer client (send :data:`AUTH`) is registered first;
    without ``passphrase``, no keystore passphrase is given (as README's first command);
    ``environment`` is added to this process's for it."""
    if provision:
        provision_test_client(home)
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = home / "serve.log"
    env = {**os.environ, **(environment or {}), "SIGND_KEYSTORE_PASSPHRASE": PASSPHRASE}
    if not passphrase:
        del env["SIGND_KEYSTORE_PASSPHRASE"]
    env.pop("SIGND_HOME", None)
    command = [sys.executable, "-c", SIGND_MAIN, "--home", str(home), "serve", "--port", str(port)]
    with log.open("wb") as output:
        process = subprocess.Popen(
            [*command, *options], stdin=subprocess.DEVNULL, stdout=output, stderr=output, env=env
        )
    server = SigndProcess(f"http://127.0.0.1:{port}", log, process)
    try:
        _wait_until(
            lambda: urllib.request.urlopen(f"{server.url}/healthz", timeout=2).status == 200,
            process,
            "signd serve",
            log,
        )
        yield server
    finally:
        server.stop()


def logged_statuses(server: SigndProcess, *paths: str) -> dict[str, list[int]]:
    """Each path's statuses in the server's access lines, once each of ``paths`` has one
    (access lines are written within 50 ms; this waits at most 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        statuses: dict[str, list[int]] = {}
        for line in server.log.read_text().splitlines():
            if line.startswith("{") and '"event": "request"' in line:
                entry = json.loads(line)
                statuses.setdefault(entry["path"], []).append(entry["status"])
        if all(path in statuses for path in paths) or time.monotonic() > deadline:
            return statuses
        time.sleep(0.1)


def ensure_node_modules() -> None:
    """``npm ci`` in tests/api/e2e when node_modules is missing (kept between runs)."""
    if (E2E_DIR / "node_modules" / "hardhat").is_dir() and (
        E2E_DIR / "node_modules" / "ethers"
    ).is_dir():
        return
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        _unavailable("node and npm are needed for the end-to-end tests")
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=E2E_DIR,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        _unavailable(f"npm ci failed (is the npm registry reachable?):\n{result.stderr[-2000:]}")


@contextmanager
def hardhat_node(workdir: Path) -> Iterator[str]:
    """A hardhat node on 127.0.0.1 (chain 31337, funded default accounts); its URL."""
    ensure_node_modules()
    node = shutil.which("node")
    assert node is not None
    port = free_port()
    log = workdir / "hardhat.log"
    cli = E2E_DIR / "node_modules" / "hardhat" / "internal" / "cli" / "cli.js"
    env = {**os.environ, "HARDHAT_DISABLE_TELEMETRY_PROMPT": "true", "CI": "true"}
    with log.open("wb") as output:
        process = subprocess.Popen(
            [node, str(cli), "node", "--hostname", "127.0.0.1", "--port", str(port)],
            cwd=E2E_DIR,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until(
            lambda: rpc_call(url, "eth_chainId", [], timeout=2).get("result") == "0x7a69",
            process,
            "hardhat node",
            log,
        )
        yield url
    finally:
        _stop(process)
