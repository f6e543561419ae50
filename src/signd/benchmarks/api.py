"""Benchmarks of ``signd serve`` over HTTP on 127.0.0.1.

Every figure starts ``python -m signd --home HOME serve`` as a child process on a free
127.0.0.1 port, over a throwaway home (blind signing allowed, cheap scrypt, keys created
beforehand through the service), and stops it and removes the home when done. The home has
one of two custody set-ups (:data:`CUSTODY_SETUPS`): keystore custody only, so the gate
(authentication, policy, audit sealing) runs in the server's process; or the default
custody, as a default home deploys it (an enclave process started on first use, the embedded
kms-server), so the gate runs in the enclave and the keys are sealed there: the figures
named ``api-*-enclave``. The hash figure's
baseline is :func:`bare_app`, one Starlette POST route that parses a JSON body and answers a
small JSON object, served by uvicorn in a child process with the settings ``signd serve``
uses (one worker, uvicorn's default event loop and HTTP implementation, no access log, no
server header). uvicorn's defaults pick uvloop and httptools when they are installed (the
``uvicorn[standard]`` extra), else asyncio and h11; both servers get the same, and the
baseline's name says which.

The load comes from ``wrk`` (Debian's package; a Lua script sets the POST body) when it is
on ``PATH``: one thread, bounded by a duration, stopping by itself. Without it, a Python
asyncio generator in this process keeps the connections busy instead; on a 2-core machine
it takes CPU from the server, so its figures are lower. Each figure's name says which one
ran. Every run is checked: a non-2xx answer or a socket error fails the benchmark, and after
the load signd's own ``/metrics`` must count no error and at least as many signatures as
answers were received.

``SIGND_BENCH_SIZE=tiny`` (see :mod:`signd.benchmarks.enclave`) shrinks every duration and
size so that tests can run the benchmarks in seconds; those figures mean nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any, Final, TypeVar

import coincurve
from rich.console import Console
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from signd.benchmarks.enclave import SIZE_ENV
from signd.benchmarks.harness import BenchResult, benchmark, rate
from signd.config import load_settings
from signd.crypto.secret import Secret
from signd.operations.backends import build_signer
from signd.operations.signer import Signer
from signd.secrets import KEYSTORE_PASSPHRASE_ENV

HOST: Final = "127.0.0.1"
KEYS_PATH: Final = "/v1/keys"
HASH_PATH: Final = "/v1/sign/hash"
BATCH_PATH: Final = "/v1/sign/batch"
RPC_PATH: Final = "/rpc"
RPC_BATCH_ITEMS: Final = 100
"""Members of the JSON-RPC batch benchmark's batches (ethers.js batches up to 100)."""
TRANSACTION_PATH: Final = "/v1/sign/ethereum/transaction"
BARE_PATH: Final = "/echo"
STARTUP_TIMEOUT: Final = 60.0
REQUEST_TIMEOUT: Final = 30.0
_PASSPHRASE: Final = "signd api benchmark passphrase"  # noqa: S105 - a throwaway keystore
_WRK_LINE: Final = re.compile(rb"^signd-bench (\S+) (\S+) (\S+) (\S+) (\S+)$", re.MULTILINE)
_SIGNATURE_SAMPLE: Final = {
    "signature": "0x" + "ab" * 65,
    "r": "0x" + "ab" * 32,
    "s": "0x" + "ab" * 32,
    "recovery_id": 0,
}
EIP1559_TRANSACTION: Final[Mapping[str, Any]] = {
    "type": 2,
    "chainId": 1,
    "nonce": 7,
    "to": "0x3535353535353535353535353535353535353535",
    "value": 10**18,
    "gas": 21000,
    "maxFeePerGas": 40 * 10**9,
    "maxPriorityFeePerGas": 2 * 10**9,
    "data": "0x",
}

_progress = Console(stderr=True)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Sizes:
    """How long and how hard each benchmark loads the server."""

    seconds: int
    """Length of one measured load run (wrk takes whole seconds)."""
    warmup_seconds: int
    rounds: int
    """Measured runs of signd and of its baseline, alternating; the median is reported."""
    connections: int
    batch_items: int
    batch_connections: int
    keys: int
    """Keys the batch items take turns with."""
    local_iterations: int
    """Calls per in-process baseline measurement."""


FULL: Final = Sizes(5, 1, 3, 50, 1000, 4, 16, 5000)
QUICK: Final = Sizes(2, 1, 1, 50, 1000, 4, 16, 2000)
TINY: Final = Sizes(1, 0, 1, 4, 10, 2, 2, 20)


def sizes(quick: bool) -> Sizes:
    """The sizes for this run: tiny when ``SIGND_BENCH_SIZE=tiny``, else quick or full."""
    if os.environ.get(SIZE_ENV) == "tiny":
        return TINY
    return QUICK if quick else FULL


@dataclass(frozen=True, slots=True)
class CustodySetup:
    """Where the benchmark's keys live and, with them, where ``signd serve`` runs its gate."""

    custody: str
    """The custody type the keys are created with."""
    config: str
    """The ``signd.toml`` lines that choose it."""
    label: str
    """What the figure names add (nothing for the keystore, the first set measured)."""
    gate: str
    """What ``signd serve`` logs at start-up about where its gate runs."""


CUSTODY_SETUPS: Final[Mapping[str, CustodySetup]] = {
    "keystore": CustodySetup(
        "keystore", '[custody]\nenabled = ["keystore"]\n\n', "", "gate: in this process"
    ),
    "enclave": CustodySetup("enclave", "", ", enclave custody and gate", "gate: in the enclave"),
}
"""Keystore custody only (the gate in the server's process), or the default custody (enclave
and keystore; the gate in the enclave, which ``signd serve`` starts with the embedded
kms-server)."""


# The baseline server


async def _echo(request: Request) -> JSONResponse:
    json.loads(await request.body())
    return JSONResponse(_SIGNATURE_SAMPLE)


async def _healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


def bare_app() -> Starlette:
    """The baseline: parse the JSON body, answer a signature-sized JSON object; no signing."""
    return Starlette(
        routes=[
            Route(BARE_PATH, _echo, methods=["POST"]),
            Route("/healthz", _healthz, methods=["GET"]),
        ]
    )


def uvicorn_implementations() -> str:
    """The event loop and HTTP parser uvicorn's defaults (``auto``) pick here, as
    ``signd serve`` and the baseline both run them."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"{loop} + {http}"


# Child processes


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT) as response:  # noqa: S310
        body: bytes = response.read()
        return body


def _post(url: str, body: bytes) -> Any:
    request = urllib.request.Request(  # noqa: S310 - our own http://127.0.0.1 servers
        url, body, {"content-type": "application/json", "authorization": f"Bearer {_BENCH_TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:  # noqa: S310
        return json.loads(response.read())


@contextmanager
def _serving(what: str, command: list[str], log_path: Path, env: dict[str, str]) -> Iterator[str]:
    """Run ``command`` (which listens on the port in its arguments) until the block ends; the
    base URL, once ``/healthz`` answers. The process is stopped whatever happens."""
    port = command[command.index("--port") + 1]
    url = f"http://{HOST}:{port}"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{what} exited with {process.returncode}:\n{tail}")
            try:
                _get(f"{url}/healthz")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _child_environment() -> dict[str, str]:
    """This environment without signd's own variables, plus the keystore passphrase."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SIGND_")}
    return environment | {KEYSTORE_PASSPHRASE_ENV: _PASSPHRASE}


_BENCH_TOKEN = "signd-benchmark-bearer-token"  # noqa: S105 - a throwaway benchmark client
_BENCH_CLIENTS = f"""\
version = 1

[[clients]]
id = "bench"
scopes = ["keys:create", "keys:read", "sign:hash", "sign:message", "sign:transaction"]
key_labels = ["*"]
token_sha256 = "{hashlib.sha256(_BENCH_TOKEN.encode()).hexdigest()}"
"""
_BENCH_POLICY = """\
version = 1

[[rules]]
name = "bench-transactions"
clients = ["bench"]
key_labels = ["*"]
operations = ["keys:create", "sign:transaction", "sign:message"]
chains = ["ethereum"]
allow_contract_creation = true
contract_selectors = ["*"]

[[rules]]
name = "bench-blind"
clients = ["bench"]
key_labels = ["*"]
operations = ["sign:hash"]
chains = ["ethereum"]
blind_signing = true
"""


def _signd_home(folder: Path, setup: CustodySetup, *, max_batch: int = 100) -> Path:
    """A home in ``folder`` with ``setup``'s custody (cheap scrypt), blind signing allowed,
    and a bearer client ``bench`` that the policy allows everything (what every request
    sends)."""
    home = folder / "home"
    home.mkdir(mode=0o700)
    (home / "clients.toml").write_text(_BENCH_CLIENTS)
    (home / "policy.toml").write_text(_BENCH_POLICY)
    (home / "signd.toml").write_text(
        f"[keystore]\nscrypt_n = 1024\n\n{setup.config}"
        f"[api]\nallow_blind_signing = true\nmax_batch = {max_batch}\n"
    )
    return home


@contextmanager
def _signd_serve(home: Path, setup: CustodySetup) -> Iterator[str]:
    """``signd serve`` on ``home`` as deployed (its access log included, to a file), once it
    has logged that its gate runs where ``setup`` puts it."""
    command = [
        *(sys.executable, "-m", "signd", "--home", str(home), "serve"),
        *("--host", HOST, "--port", str(_free_port())),
    ]
    log_path = home / "serve.log"
    with _serving("signd serve", command, log_path, _child_environment()) as url:
        if setup.gate not in log_path.read_text(errors="replace"):
            raise AssertionError(f"signd serve did not log {setup.gate!r}")
        yield url


@contextmanager
def _bare_serve(folder: Path) -> Iterator[str]:
    """:func:`bare_app` under uvicorn with the settings ``signd serve`` passes to it."""
    command = [
        *(sys.executable, "-m", "uvicorn", "--factory", f"{__name__}:bare_app"),
        *("--host", HOST, "--port", str(_free_port()), "--log-level", "warning"),
        *("--no-access-log", "--no-server-header", "--timeout-graceful-shutdown", "10"),
    ]
    with _serving("the bare Starlette app", command, folder / "bare.log", os.environ.copy()) as url:
        yield url


def _open_signer(home: Path) -> Signer:
    """A signer in this process over ``home``'s custody (an enclave custody starts its own
    enclave process and shares the server's kms-server)."""
    return build_signer(load_settings(home), passphrase=lambda creating: Secret(_PASSPHRASE))


def _create_keys(base_url: str, setup: CustodySetup, count: int) -> list[Mapping[str, Any]]:
    """``count`` Ethereum keys with ``setup``'s custody, created through the service."""
    body = {"chain": "ethereum", "custody": setup.custody, "count": count}
    keys: list[Mapping[str, Any]] = _post(base_url + KEYS_PATH, json.dumps(body).encode())["keys"]
    if len(keys) != count or any(key["custody"] != setup.custody for key in keys):
        raise AssertionError(f"signd did not create {count} {setup.custody} keys")
    return keys


# Load generators


@dataclass(frozen=True, slots=True)
class Load:
    """What one bounded load run measured."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


LoadGenerator = Callable[[str, bytes, int, int], Load]
"""Takes the URL, the POST body, the number of connections and the seconds to run."""

_WRK_SCRIPT = """\
local body = io.open([==[{body}]==], "rb")
wrk.method = "POST"
wrk.body = body:read("*a")
body:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {token}"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("signd-bench %d %d %.1f %.1f %d\\n", summary.requests,
    summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def wrk_load(url: str, body: bytes, connections: int, seconds: int) -> Load:
    """One ``wrk`` run (one thread) POSTing ``body`` on ``connections`` keep-alive connections."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed")
    with tempfile.TemporaryDirectory(prefix="signd-bench-wrk-") as folder:
        body_path, script_path = Path(folder) / "body.json", Path(folder) / "post.lua"
        body_path.write_bytes(body)
        script_path.write_text(_WRK_SCRIPT.format(body=body_path, token=_BENCH_TOKEN))
        command = [
            *(wrk, "--threads", "1", "--connections", str(connections)),
            *("--duration", f"{seconds}s", "--timeout", f"{REQUEST_TIMEOUT:g}s"),
            *("--script", str(script_path), url),
        ]
        finished = subprocess.run(
            command, capture_output=True, timeout=seconds + 2 * REQUEST_TIMEOUT, check=False
        )
    found = _WRK_LINE.search(finished.stdout)
    if finished.returncode != 0 or found is None:
        raise RuntimeError(f"wrk failed ({finished.returncode}): {finished.stderr[-2000:]!r}")
    requests, duration_us, p50_us, p99_us, errors = (float(v) for v in found.groups())
    return Load(int(requests), duration_us / 1e6, p50_us / 1000, p99_us / 1000, int(errors))


def _percentile(samples: list[float], percent: int) -> float:
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[percent - 1]


async def _python_load_async(url: str, body: bytes, connections: int, seconds: int) -> Load:
    rest = url.removeprefix("http://")
    address, _, path = rest.partition("/")
    host, _, port = address.partition(":")
    head = (
        f"POST /{path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {_BENCH_TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    request = head.encode() + body
    latencies: list[float] = []
    errors = 0
    started = time.perf_counter()
    deadline = started + seconds

    async def connection() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                writer.write(request)
                answer = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", answer)
                if length is None:
                    raise RuntimeError("an answer without Content-Length")
                await reader.readexactly(int(length[1]))
                latencies.append(time.perf_counter() - sent)
                if not answer.startswith((b"HTTP/1.1 2", b"HTTP/1.0 2")):
                    errors += 1
        finally:
            writer.close()
            await writer.wait_closed()

    async with asyncio.timeout(seconds + 2 * REQUEST_TIMEOUT):
        await asyncio.gather(*(connection() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    return Load(
        len(latencies),
        elapsed,
        _percentile(latencies, 50) * 1000,
        _percentile(latencies, 99) * 1000,
        errors,
    )


def python_load(url: str, body: bytes, connections: int, seconds: int) -> Load:
    """The fallback: an asyncio HTTP/1.1 keep-alive client in this process (steals CPU)."""
    return asyncio.run(_python_load_async(url, body, connections, seconds))


def load_generator() -> tuple[str, LoadGenerator]:
    """wrk when installed, else the Python generator; with the name figures carry."""
    if shutil.which("wrk"):
        return "wrk", wrk_load
    return "Python asyncio load", python_load


def _metric_total(base_url: str, name: str) -> float:
    """The sum of every sample of one counter in signd's ``/metrics``."""
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", re.MULTILINE)
    text = _get(f"{base_url}/metrics").decode()
    return sum(float(value) for value in pattern.findall(text))


def _check_signd_counted(base_url: str, answered_signatures: int) -> None:
    """signd counted no error, and at least one signature per signature answered."""
    errors = _metric_total(base_url, "signd_errors_total")
    signed = _metric_total(base_url, "signd_signatures_total")
    if errors or signed < answered_signatures:
        raise AssertionError(
            f"signd counted {errors:g} errors and {signed:g} signatures "
            f"for {answered_signatures} signatures answered"
        )


class _Runs:
    """Checked load runs against one URL, counting the answers (warm-ups included)."""

    def __init__(
        self, generate: LoadGenerator, url: str, body: bytes, connections: int, seconds: int
    ) -> None:
        self._generate = generate
        self._url, self._body = url, body
        self._connections, self._seconds = connections, seconds
        self.answered = 0

    def run(self, seconds: int) -> Load:
        load = self._generate(self._url, self._body, self._connections, seconds)
        if load.errors or load.requests == 0:
            raise AssertionError(f"{self._url}: {load.errors} errors in {load.requests} requests")
        self.answered += load.requests
        return load

    def warm_up(self, seconds: int) -> None:
        if seconds:
            self.run(seconds)

    def measure(self) -> Load:
        return self.run(self._seconds)


def _alternate(
    rounds: int, ours: Callable[[], Load], baseline: Callable[[], T], what: str
) -> tuple[list[Load], list[T]]:
    """``rounds`` runs of signd, each followed by one of its baseline."""
    loads: list[Load] = []
    baselines: list[T] = []
    for number in range(1, rounds + 1):
        _progress.print(f"  round {number}/{rounds}: {what}")
        loads.append(ours())
        baselines.append(baseline())
    return loads, baselines


def _alternate_runs(
    size: Sizes, ours: _Runs, theirs: _Runs, what: str
) -> tuple[list[Load], list[Load]]:
    """Both warmed up, then :func:`_alternate` of their measured runs."""
    ours.warm_up(size.warmup_seconds)
    theirs.warm_up(size.warmup_seconds)
    return _alternate(size.rounds, ours.measure, theirs.measure, what)


# Benchmarks


def _sign_hash(quick: bool, setup: CustodySetup) -> list[BenchResult]:
    size = sizes(quick)
    generator_name, generate = load_generator()
    with tempfile.TemporaryDirectory(prefix="signd-bench-api-") as folder:
        home = _signd_home(Path(folder), setup)
        with _signd_serve(home, setup) as signd, _bare_serve(Path(folder)) as bare:
            (key,) = _create_keys(signd, setup, 1)
            body = json.dumps({"key": key["key_id"], "hash": "0x" + secrets.token_hex(32)}).encode()
            if "signature" not in _post(signd + HASH_PATH, body):
                raise AssertionError("signd did not answer a signature")
            _post(bare + BARE_PATH, body)
            ours = _Runs(generate, signd + HASH_PATH, body, size.connections, size.seconds)
            theirs = _Runs(generate, bare + BARE_PATH, body, size.connections, size.seconds)
            loads, bare_loads = _alternate_runs(
                size,
                ours,
                theirs,
                f"{size.connections} connections on signd{setup.label}, then on the bare app, "
                f"{size.seconds} s each ({generator_name})",
            )
            _check_signd_counted(signd, ours.answered)
    where = f"{setup.label}, {size.connections} connections ({generator_name})"
    baseline_name = f"bare Starlette JSON POST, same uvicorn settings ({uvicorn_implementations()})"
    return [
        BenchResult(
            f"REST POST /v1/sign/hash{where}",
            "req/s",
            statistics.median(load.rate for load in loads),
            baseline_name,
            statistics.median(load.rate for load in bare_loads),
            "≥ 0.35×",
        ),
        *(
            BenchResult(
                f"REST POST /v1/sign/hash latency {name}{where}",
                "ms",
                statistics.median(figure(load) for load in loads),
                baseline_name,
                statistics.median(figure(load) for load in bare_loads),
                "reported (no target)",
                higher_is_better=False,
            )
            for name, figure in (("p50", attrgetter("p50_ms")), ("p99", attrgetter("p99_ms")))
        ),
    ]


@benchmark("api-sign-hash")
def api_sign_hash(quick: bool) -> list[BenchResult]:
    """POST /v1/sign/hash at 50 connections vs a bare Starlette POST endpoint (keystore)."""
    return _sign_hash(quick, CUSTODY_SETUPS["keystore"])


@benchmark("api-sign-hash-enclave")
def api_sign_hash_enclave(quick: bool) -> list[BenchResult]:
    """``api-sign-hash`` with enclave custody, the gate in the enclave (the default)."""
    return _sign_hash(quick, CUSTODY_SETUPS["enclave"])


def _sign_batch(quick: bool, setup: CustodySetup) -> list[BenchResult]:
    size = sizes(quick)
    generator_name, generate = load_generator()
    with tempfile.TemporaryDirectory(prefix="signd-bench-api-") as folder:
        home = _signd_home(Path(folder), setup, max_batch=size.batch_items)
        raw_key, digest = coincurve.PrivateKey(), secrets.token_bytes(32)
        with _signd_serve(home, setup) as signd:
            keys = _create_keys(signd, setup, size.keys)
            items = [
                {
                    "type": "hash",
                    "key": keys[i % len(keys)]["key_id"],
                    "hash": "0x" + secrets.token_hex(32),
                }
                for i in range(size.batch_items)
            ]
            body = json.dumps({"requests": items}).encode()
            results = _post(signd + BATCH_PATH, body)["results"]
            if len(results) != len(items) or not all("signature" in r for r in results):
                raise AssertionError("signd did not answer a signature for every batch item")
            ours = _Runs(generate, signd + BATCH_PATH, body, size.batch_connections, size.seconds)
            ours.warm_up(size.warmup_seconds)
            loads, base_rates = _alternate(
                size.rounds,
                ours.measure,
                lambda: rate(
                    lambda: raw_key.sign_recoverable(digest, hasher=None),
                    iterations=size.local_iterations,
                ),
                f"{size.batch_connections} clients posting batches of {size.batch_items:,}"
                f"{setup.label} for {size.seconds} s ({generator_name})",
            )
            _check_signd_counted(signd, ours.answered * size.batch_items)
    return [
        BenchResult(
            f"REST POST /v1/sign/batch, {size.batch_items:,} hashes per request over "
            f"{size.keys} keys{setup.label}, {size.batch_connections} clients ({generator_name})",
            "sig/s",
            statistics.median(load.rate for load in loads) * size.batch_items,
            "coincurve sign_recoverable in-process, 1 thread",
            statistics.median(base_rates),
            "≥ 30,000 sig/s absolute",
        )
    ]


@benchmark("api-sign-batch")
def api_sign_batch(quick: bool) -> list[BenchResult]:
    """POST /v1/sign/batch of hash items, several clients, vs raw coincurve in this process
    (keystore)."""
    return _sign_batch(quick, CUSTODY_SETUPS["keystore"])


@benchmark("api-sign-batch-enclave")
def api_sign_batch_enclave(quick: bool) -> list[BenchResult]:
    """``api-sign-batch`` with enclave custody, the gate in the enclave (the default)."""
    return _sign_batch(quick, CUSTODY_SETUPS["enclave"])


@benchmark("api-sign-batch-cold-enclave")
def api_sign_batch_cold_enclave(quick: bool) -> list[BenchResult]:
    """A batch over keys created together and never signed with (sweeping deposit addresses):
    each key unsealed in the enclave on the way, against the same batch again, warm."""
    setup, size = CUSTODY_SETUPS["enclave"], sizes(quick)
    cold_rates: list[float] = []
    warm_rates: list[float] = []
    with tempfile.TemporaryDirectory(prefix="signd-bench-api-") as folder:
        home = _signd_home(Path(folder), setup, max_batch=size.batch_items)
        with _signd_serve(home, setup) as signd:
            for _ in range(size.rounds):
                keys = _create_keys(signd, setup, size.batch_items)
                body = json.dumps(
                    {"requests": [{"type": "hash", "key": key["key_id"]} | _hash() for key in keys]}
                ).encode()
                for rates in (cold_rates, warm_rates):
                    started = time.perf_counter()
                    results = _post(signd + BATCH_PATH, body)["results"]
                    rates.append(len(keys) / (time.perf_counter() - started))
                    if len(results) != len(keys) or not all("signature" in r for r in results):
                        raise AssertionError("signd did not sign every item of the cold batch")
    return [
        BenchResult(
            f"REST POST /v1/sign/batch, {size.batch_items:,} hashes over as many keys created "
            f"together and never used{setup.label}, one client",
            "sig/s",
            statistics.median(cold_rates),
            "the same batch again (keys unsealed)",
            statistics.median(warm_rates),
            "reported",
        )
    ]


def _hash() -> dict[str, str]:
    return {"hash": "0x" + secrets.token_hex(32)}


def _rpc_batch(quick: bool, setup: CustodySetup) -> list[BenchResult]:
    size = sizes(quick)
    count = min(RPC_BATCH_ITEMS, size.batch_items)
    generator_name, generate = load_generator()
    with tempfile.TemporaryDirectory(prefix="signd-bench-api-") as folder:
        home = _signd_home(Path(folder), setup, max_batch=count)
        with _signd_serve(home, setup) as signd:
            keys = _create_keys(signd, setup, size.keys)
            messages = [(keys[i % len(keys)]["address"], f"message {i}") for i in range(count)]
            calls = [
                {
                    "jsonrpc": "2.0",
                    "id": i,
                    "method": "personal_sign",
                    "params": ["0x" + text.encode().hex(), address],
                }
                for i, (address, text) in enumerate(messages)
            ]
            items = [
                {"type": "ethereum/message", "key": address, "message": text}
                for address, text in messages
            ]
            rpc_body = json.dumps(calls).encode()
            rest_body = json.dumps({"requests": items}).encode()
            answers = _post(signd + RPC_PATH, rpc_body)
            results = _post(signd + BATCH_PATH, rest_body)["results"]
            if [answer.get("result") for answer in answers] != [
                result.get("signature") for result in results
            ]:
                raise AssertionError("signd's JSON-RPC and REST batches disagree")
            ours = _Runs(generate, signd + RPC_PATH, rpc_body, size.batch_connections, size.seconds)
            rest = _Runs(
                generate, signd + BATCH_PATH, rest_body, size.batch_connections, size.seconds
            )
            loads, rest_loads = _alternate_runs(
                size,
                ours,
                rest,
                f"{size.batch_connections} clients posting batches of {count} messages"
                f"{setup.label} for {size.seconds} s ({generator_name}), JSON-RPC then REST",
            )
            _check_signd_counted(signd, (ours.answered + rest.answered) * count)
    return [
        BenchResult(
            f"JSON-RPC batch of {count} personal_sign over {size.keys} keys{setup.label}, "
            f"{size.batch_connections} clients ({generator_name})",
            "sig/s",
            statistics.median(load.rate for load in loads) * count,
            "the same messages as a REST batch (POST /v1/sign/batch), same server",
            statistics.median(load.rate for load in rest_loads) * count,
            "reported (no target)",
        )
    ]


@benchmark("api-rpc-batch")
def api_rpc_batch(quick: bool) -> list[BenchResult]:
    """A JSON-RPC batch of personal_sign calls (as ethers.js sends them) vs the same messages
    as one REST batch, alternating on the same server (keystore)."""
    return _rpc_batch(quick, CUSTODY_SETUPS["keystore"])


@benchmark("api-rpc-batch-enclave")
def api_rpc_batch_enclave(quick: bool) -> list[BenchResult]:
    """``api-rpc-batch`` with enclave custody, the gate in the enclave (the default)."""
    return _rpc_batch(quick, CUSTODY_SETUPS["enclave"])


def _eth_transaction(quick: bool, setup: CustodySetup) -> list[BenchResult]:
    size = sizes(quick)
    generator_name, generate = load_generator()
    with (
        tempfile.TemporaryDirectory(prefix="signd-bench-api-") as folder,
        _signd_serve(_signd_home(Path(folder), setup), setup) as signd,
    ):
        (key,) = _create_keys(signd, setup, 1)
        body = json.dumps({"key": key["address"], "transaction": EIP1559_TRANSACTION}).encode()
        with _open_signer(Path(folder) / "home") as local:
            expected = local.sign_eth_transaction(key["key_id"], EIP1559_TRANSACTION).raw
            if _post(signd + TRANSACTION_PATH, body).get("raw_transaction") != (
                "0x" + expected.hex()
            ):
                raise AssertionError("signd over REST and the Signer disagree")
            ours = _Runs(generate, signd + TRANSACTION_PATH, body, size.connections, size.seconds)
            ours.warm_up(size.warmup_seconds)
            loads, base_rates = _alternate(
                size.rounds,
                ours.measure,
                lambda: rate(
                    lambda: local.sign_eth_transaction(key["key_id"], EIP1559_TRANSACTION),
                    iterations=size.local_iterations,
                ),
                f"{size.connections} connections{setup.label} for {size.seconds} s "
                f"({generator_name}), then the Signer in-process",
            )
        _check_signd_counted(signd, ours.answered)
    return [
        BenchResult(
            f"REST EIP-1559 tx sign{setup.label}, {size.connections} connections "
            f"({generator_name})",
            "tx/s",
            statistics.median(load.rate for load in loads),
            f"Signer.sign_eth_transaction in-process ({setup.custody})",
            statistics.median(base_rates),
            "reported (no target)",
        )
    ]


@benchmark("api-eth-tx")
def api_eth_transaction(quick: bool) -> list[BenchResult]:
    """EIP-1559 transactions through POST /v1/sign/ethereum/transaction vs the Signer in-process
    (keystore).

    The Signer opens the same home as the server (SQLite reads from two processes); the
    server's answer must be byte-identical to its transaction before any load.
    """
    return _eth_transaction(quick, CUSTODY_SETUPS["keystore"])


@benchmark("api-eth-tx-enclave")
def api_eth_transaction_enclave(quick: bool) -> list[BenchResult]:
    """``api-eth-tx`` with enclave custody, the gate in the enclave (the default); the Signer
    in-process signs with the same sealed key through an enclave process of its own."""
    return _eth_transaction(quick, CUSTODY_SETUPS["enclave"])
