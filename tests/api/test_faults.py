"""``signd serve`` while its dependencies fail under load: KMS, blob storage, the enclave and
the metadata store killed, stuck or gone while signed requests are in flight.

Each test runs a real ``signd serve`` (the auto-started enclave process, SQLite or a real
PostgreSQL, filesystem blobs) and a bounded stream of concurrent requests from the
development client. What must hold, whatever fails:

- every answer is a success or ``503`` with the JSON error code ``dependency_unavailable``:
  no other 5xx, no dropped connection, none slower than :data:`ANSWER_WITHIN`;
- while a dependency is down, cold signatures and key creation answer 503 quickly and
  ``/readyz`` answers 503 naming it;
- once it is back, requests succeed again without restarting ``signd serve``, and every key
  ever reported created (before or during the fault) is listed and still signs.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import pytest

from signd.auth import sign_request
from signd.client import key_from_dict, load_request_key
from signd.crypto.secp256k1 import RecoverableSignature
from signd.enclave.client import EnclaveClient
from signd.enclave.transport import UnixTransport
from signd.errors import DependencyUnavailable
from signd.gate.setup import DEV_CLIENT_ID, DEV_CLIENT_KEY
from signd.kms.server import ServerInfo
from signd.kms.server.http import answers, start_kms_server_process
from signd.operations.local_kms import EmbeddedKms
from tests.api.conftest import make_home
from tests.api.processes import SigndProcess, signd_serve
from tests.fixtures.servers import postgres_server, squatter
from tests.integration.support import AWS_ENV, child_pids, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DIGEST: Final = bytes(range(32))
HASH: Final = "0x" + DIGEST.hex()
UNAVAILABLE: Final = "dependency_unavailable"
ANSWER_WITHIN: Final = 15.0
"""Every request is answered within this, fault or not (the slowest path: an enclave request
timing out after ``[enclave] timeout`` and its retry's handshake timing out too)."""
RECOVER_WITHIN: Final = 30.0
WORKERS: Final = 4
MAX_REQUESTS: Final = 2000
"""Per load worker: the load is bounded in count as well as in time."""
PAUSE: Final = 0.02
"""Seconds each load worker waits between requests."""
FAST_FAILURE: Final = "[enclave]\ntimeout = 3\n\n[api]\nhealth_timeout = 10\n"
"""The enclave's request timeout below /readyz's wait, so /readyz says why, not just 'slow'."""


# --------------------------------------------------------------------------- the client side


class Api:
    """The development client's signed requests to a running ``signd serve``."""

    def __init__(self, server: SigndProcess, home: Path) -> None:
        self._key = load_request_key(home / DEV_CLIENT_KEY)
        self._http = httpx.Client(base_url=server.url, timeout=ANSWER_WITHIN * 2)

    def close(self) -> None:
        self._http.close()

    def call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        content = b"" if body is None else json.dumps(body).encode()
        headers = sign_request(method, path, content, DEV_CLIENT_ID, self._key)
        if body is not None:
            headers["content-type"] = "application/json"
        return self._http.request(method, path, content=content, headers=headers)

    def create(self, count: int = 1) -> httpx.Response:
        return self.call(
            "POST", "/v1/keys", {"chain": "ethereum", "custody": "enclave", "count": count}
        )

    def sign(self, key: dict[str, Any]) -> httpx.Response:
        return self.call("POST", "/v1/sign/hash", {"key": key["key_id"], "hash": HASH})

    def readyz(self) -> httpx.Response:
        return self._http.get("/readyz")

    def created(self, count: int) -> list[dict[str, Any]]:
        response = self.create(count)
        assert response.status_code == 201, response.text
        keys: list[dict[str, Any]] = response.json()["keys"]
        return keys

    def listed(self) -> set[str]:
        response = self.call("GET", "/v1/keys?custody=enclave&limit=1000")
        assert response.status_code == 200, response.text
        return {key["key_id"] for key in response.json()["keys"]}


def signed_by(response: httpx.Response, key: dict[str, Any]) -> bool:
    """Whether a signing answer is a signature of :data:`DIGEST` by ``key``."""
    answer = response.json()
    signature = RecoverableSignature(
        int(answer["r"], 16), int(answer["s"], 16), answer["recovery_id"]
    )
    return signature.recover_public_key(DIGEST) == key_from_dict(key).public_key


def error_of(response: httpx.Response) -> dict[str, str] | None:
    """The JSON error of an answer (``None`` when it has none)."""
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return None
    return error if isinstance(error, dict) else None


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request of the load: its answer's status and error, and how long it took."""

    what: str
    status: int | None
    """``None``: no HTTP answer at all (a dropped connection or a client timeout)."""
    error: dict[str, str] | None
    """The JSON error of the answer, or what went wrong without one."""
    seconds: float


@dataclass
class Load:
    """:data:`WORKERS` threads signing with ``keys`` (and now and then creating one) until
    stopped; every answer is recorded, and the keys it created are kept."""

    server: SigndProcess
    home: Path
    keys: list[dict[str, Any]]
    outcomes: list[Outcome] = field(default_factory=list)
    created: list[dict[str, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for index in range(WORKERS):
            thread = threading.Thread(target=self._work, args=(index,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(ANSWER_WITHIN * 2 + 5)
        assert not any(thread.is_alive() for thread in self._threads), "a load worker hangs"

    def _work(self, index: int) -> None:
        api = Api(self.server, self.home)
        choose = random.Random(index)
        try:
            for _ in range(MAX_REQUESTS):
                if self._stop.is_set():
                    return
                self.outcomes.append(self._one(api, choose))
                self._stop.wait(PAUSE)
        finally:
            api.close()

    def _one(self, api: Api, choose: random.Random) -> Outcome:
        creating = choose.random() < 0.2
        what = "create" if creating else "sign"
        key = choose.choice(self.keys)
        started = time.monotonic()
        try:
            response = api.create() if creating else api.sign(key)
        except httpx.HTTPError as exc:
            dropped = {"code": "no_answer", "message": type(exc).__name__}
            return Outcome(what, None, dropped, time.monotonic() - started)
        seconds = time.monotonic() - started
        error = error_of(response)
        if response.status_code == 201:
            self.created.extend(response.json()["keys"])
        elif response.status_code == 200 and not signed_by(response, key):
            error = {"code": "wrong_signature", "message": response.text}
        return Outcome(what, response.status_code, error, seconds)

    def met_the_fault(self) -> None:
        """Wait until a request of the load has been answered 503."""
        wait_until(
            lambda: any(o.status == 503 for o in self.outcomes),
            timeout=ANSWER_WITHIN,
            what="a 503 answer to the load",
        )

    def check(self, *, saw_fault: bool, enclave_restarted: bool = False) -> None:
        """Every answer a success or a quick 503 ``dependency_unavailable``; with ``saw_fault``,
        at least one of them a 503.

        With ``enclave_restarted``, a request signed before the new enclave started may also be
        refused with 401 and asked to be signed again: the enclave checks nonces for replay in
        its memory, so it cannot accept a request older than itself.
        """
        assert len(self.outcomes) >= WORKERS, "the load did not run"
        wrong = [
            o
            for o in self.outcomes
            if not (o.status in (200, 201) and o.error is None)
            and not (o.status == 503 and o.error is not None and o.error["code"] == UNAVAILABLE)
            and not (enclave_restarted and o.status == 401 and signed_too_early(o.error))
        ]
        assert wrong == [], f"{len(wrong)} of {len(self.outcomes)} answers were wrong: {wrong[:5]}"
        slowest = max(o.seconds for o in self.outcomes)
        assert slowest < ANSWER_WITHIN, f"an answer took {slowest:.1f} s"
        if saw_fault:
            assert any(o.status == 503 for o in self.outcomes), "the load never met the fault"
        assert any(o.status == 200 for o in self.outcomes)


# --------------------------------------------------------------------------- checks


def signed_too_early(error: dict[str, str] | None) -> bool:
    return (
        error is not None
        and error["code"] == "unauthenticated"
        and "before the enclave started" in error["message"]
    )


def quick_503(call: Callable[[], httpx.Response]) -> dict[str, str]:
    """``call`` answers 503 ``dependency_unavailable`` within :data:`ANSWER_WITHIN`; its error."""
    started = time.monotonic()
    response = call()
    assert time.monotonic() - started < ANSWER_WITHIN
    assert response.status_code == 503, response.text
    error = error_of(response)
    assert error is not None and error["code"] == UNAVAILABLE, response.text
    return error


def not_ready_because(api: Api, *words: str) -> str:
    """``/readyz`` answers 503 and its unavailable part's message holds one of ``words``."""
    response = api.readyz()
    assert response.status_code == 503, response.text
    reasons = [part for part in response.json()["parts"] if part["status"] != "ok"]
    assert reasons, response.text
    message = " ".join(part["message"] for part in reasons)
    assert any(word in message for word in words), message
    return message


def wait_until_ready(api: Api) -> None:
    wait_until(lambda: api.readyz().status_code == 200, timeout=RECOVER_WITHIN, what="/readyz 200")


def no_key_lost(api: Api, keys: list[dict[str, Any]]) -> None:
    """Every key is listed and signs; and a new key can be created and signs."""
    assert {key["key_id"] for key in keys} <= api.listed()
    [new] = api.created(1)
    for key in [*keys, new]:
        response = api.sign(key)
        assert response.status_code == 200, response.text
        assert signed_by(response, key)


def wait_for_replacement(parent: int, containing: str, old: int) -> None:
    """Wait until ``parent`` has one child matching ``containing`` again, not ``old``."""
    wait_until(
        lambda: child_pids(parent, containing=containing) not in ([], [old]),
        timeout=RECOVER_WITHIN,
        what=f"a new process {containing!r}",
    )


def enclave_pid(server: SigndProcess, home: Path) -> int:
    [pid] = child_pids(server.process.pid, containing=f"--home {home} enclave")
    return pid


def flush_enclave_cache(pid: int) -> None:
    """Drop the keys the enclave holds unsealed, so that the next signatures are cold."""
    command = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    socket_path = command[command.index("--listen") + 1].removeprefix("unix://")
    client = EnclaveClient(UnixTransport(socket_path), timeout=5.0)
    try:
        client.flush_cache()
    finally:
        client.close()


@contextmanager
def serving(home: Path) -> Iterator[tuple[SigndProcess, Api]]:
    """``signd serve`` on ``home`` with its development client, blind signing on."""
    with signd_serve(home, "--allow-blind-signing", provision=False) as server:
        api = Api(server, home)
        try:
            yield server, api
        finally:
            api.close()


# --------------------------------------------------------------------------- KMS


def test_a_killed_embedded_kms_server_is_started_again(tmp_path: Path) -> None:
    """The enclave's own kms-server SIGKILLed under load: the next KMS call starts another."""
    home = make_home(tmp_path / "home", custody=("enclave",))
    with serving(home) as (server, api):
        keys = api.created(8)
        enclave = enclave_pid(server, home)
        [kms] = child_pids(enclave, containing="signd.kms.server")
        with Load(server, home, keys) as load:
            time.sleep(0.5)
            flush_enclave_cache(enclave)
            os.kill(kms, signal.SIGKILL)
            wait_for_replacement(enclave, "signd.kms.server", kms)
            time.sleep(1.0)
        load.check(saw_fault=False)
        assert api.readyz().status_code == 200
        no_key_lost(api, keys + load.created)
        assert enclave_pid(server, home) == enclave


def test_another_program_on_a_killed_kms_servers_port_is_not_taken_for_kms(
    tmp_path: Path,
) -> None:
    """The enclave's kms-server SIGKILLed under load and its port taken at once by a plain
    HTTP server answering ``200 {}``: no answer is a 500, the enclave starts a kms-server of
    its own, and every key stays usable. (CI once saw a 500 "KMS answered without
    CiphertextForRecipient" in the test above: this is that, made certain.)"""
    home = make_home(tmp_path / "home", custody=("enclave",))
    with serving(home) as (server, api):
        keys = api.created(8)
        enclave = enclave_pid(server, home)
        [kms] = child_pids(enclave, containing="signd.kms.server")
        port = int(ServerInfo.read(home).endpoint.rsplit(":", 1)[1])
        with Load(server, home, keys) as load:
            time.sleep(0.5)
            # The enclave is held still from the kill until the port is taken: a KMS call in
            # that gap would find the port closed and start a kms-server without asking the
            # squatter (seen once with the suite's two workers busy).
            os.kill(enclave, signal.SIGSTOP)
            try:
                wait_until(lambda: stopped_whole(enclave), timeout=5.0, what="all stopped")
                os.kill(kms, signal.SIGKILL)
                with squatter(port) as other:
                    os.kill(enclave, signal.SIGCONT)
                    flush_enclave_cache(enclave)
                    wait_for_replacement(enclave, "signd.kms.server", kms)
                    time.sleep(1.0)
            finally:
                os.kill(enclave, signal.SIGCONT)
        assert other.requests >= 1, "the enclave never asked the program on the old port"
        load.check(saw_fault=False)
        assert api.readyz().status_code == 200
        no_key_lost(api, keys + load.created)
        assert enclave_pid(server, home) == enclave


def test_a_stuck_embedded_kms_server_fails_a_call_once_within_its_read_timeout(
    tmp_path: Path,
) -> None:
    """A kms-server that accepts connections but never answers: the call fails as KMS
    unavailable within the read timeout (5 s), below the host's 15 s wait for the enclave,
    instead of being asked again on a fresh client for twice as long."""
    home = tmp_path / "home"
    server = start_kms_server_process(home)
    kms = EmbeddedKms(home, recipient=None)
    try:
        data_key = kms.generate_data_key()
        [pid] = child_pids(os.getpid(), containing=f"signd.kms.server --home {home}")
        os.kill(pid, signal.SIGSTOP)
        try:
            # SIGSTOP takes effect when the process is next scheduled: wait until it has.
            stopped = "the kms-server to stop"
            wait_until(lambda: process_state(pid) == "T", timeout=5.0, what=stopped)
            started = time.monotonic()
            try:
                kms.decrypt(data_key.ciphertext)
            except DependencyUnavailable as exc:
                error = exc
            else:  # say what happened: it failed once in CI, unexplained
                pytest.fail(
                    f"decrypt answered with the kms-server stopped (state "
                    f"{process_state(pid)!r}; replaced by one of the client's own: "
                    f"{kms.server.owned})"
                )
            assert time.monotonic() - started < 8.0
            assert "KMS" in error.message
        finally:
            os.kill(pid, signal.SIGCONT)
        assert kms.decrypt(data_key.ciphertext) == data_key.plaintext
        assert not kms.server.owned
    finally:
        kms.close()
        server.stop()


def process_state(pid: int) -> str:
    """The state letter /proc shows for ``pid`` (``T``: stopped by a signal), or ``gone``."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def stopped_whole(pid: int) -> bool:
    """Whether every thread of ``pid`` is stopped by a signal (``T`` in /proc)."""
    tasks = list(Path(f"/proc/{pid}/task").glob("*/stat"))
    try:
        return bool(tasks) and all(
            task.read_text().rsplit(")", 1)[1].split()[0] == "T" for task in tasks
        )
    except FileNotFoundError:
        return False


class KmsServerProcess:
    """``signd kms-server`` as its own service, as a production KMS endpoint would be."""

    def __init__(self, home: Path, dev_ca: Path) -> None:
        self.home = home
        self.dev_ca = dev_ca
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerInfo:
        (self.home / "kms-server.json").unlink(missing_ok=True)
        command = [sys.executable, "-m", "signd.kms.server", "--home", str(self.home)]
        command += ["--port", str(self.port), "--dev-ca", str(self.dev_ca)]
        with (self.home.parent / "kms-server.log").open("ab") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        info_file = self.home / "kms-server.json"
        wait_until(
            lambda: info_file.exists() and answers(ServerInfo.read(self.home).endpoint),
            timeout=RECOVER_WITHIN,
            what="kms-server",
        )
        info = ServerInfo.read(self.home)
        self.port = int(info.endpoint.rsplit(":", 1)[1])
        return info

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def test_kms_killed_answers_503_and_readyz_names_it_until_it_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KMS as a separate service ([kms] type aws at a kms-server), SIGKILLed under load, then
    started again on the same home and port: signd serve follows without a restart."""
    home = tmp_path / "home"
    kms = KmsServerProcess(tmp_path / "kms", home / "attestation" / "dev-ca")
    kms.home.mkdir(parents=True)
    try:
        info = kms.start()
        client = info.client()
        key_id = client.create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")[
            "KeyMetadata"
        ]["KeyId"]
        client.close()
        for name, value in AWS_ENV.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", info.access_key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", str(info.secret_access_key.reveal()))
        kms_table = (
            f'[kms]\ntype = "aws"\nkey_id = "{key_id}"\nregion = "{info.region}"\n'
            f'endpoint_url = "{info.endpoint}"\nrecipient = true\n'
            "connect_timeout = 1\nread_timeout = 2\nmax_attempts = 1\n\n"
        )
        make_home(home, custody=("enclave",), extra=kms_table + FAST_FAILURE)
        with serving(home) as (server, api):
            keys = api.created(8)
            enclave = enclave_pid(server, home)
            with Load(server, home, keys) as load:
                time.sleep(0.5)
                kms.kill()
                flush_enclave_cache(enclave)
                assert "KMS" in quick_503(lambda: api.sign(keys[0]))["message"]
                assert "KMS" in quick_503(api.create)["message"]
                not_ready_because(api, "KMS")
                load.met_the_fault()
                kms.start()
                wait_until_ready(api)
                time.sleep(0.5)
            load.check(saw_fault=True)
            no_key_lost(api, keys + load.created)
            assert enclave_pid(server, home) == enclave
    finally:
        kms.stop()


# --------------------------------------------------------------------------- blob storage


def test_blob_storage_gone_answers_503_and_readyz_names_it_until_it_is_back(
    tmp_path: Path,
) -> None:
    """The filesystem blob store's folder disappears (an unmounted volume), then returns."""
    home = make_home(tmp_path / "home", custody=("enclave",), extra=FAST_FAILURE)
    blobs, away = home / "blobs", home / "blobs.unmounted"
    with serving(home) as (server, api):
        keys = api.created(8)
        enclave = enclave_pid(server, home)
        with Load(server, home, keys) as load:
            time.sleep(0.5)
            blobs.rename(away)
            try:
                flush_enclave_cache(enclave)
                assert "blob store" in quick_503(lambda: api.sign(keys[0]))["message"]
                assert "blob store" in quick_503(api.create)["message"]
                not_ready_because(api, "blob store")
                load.met_the_fault()
            finally:
                away.rename(blobs)
            wait_until_ready(api)
            time.sleep(0.5)
        load.check(saw_fault=True)
        no_key_lost(api, keys + load.created)


# --------------------------------------------------------------------------- the enclave


HANGS_AFTER: Final = 20.0
"""``[enclave] hang_timeout`` of the stuck-enclave test: longer than its checks of the 503s."""


def test_a_stuck_enclave_answers_503_then_serve_replaces_it_by_itself(tmp_path: Path) -> None:
    """The enclave stops answering (SIGSTOP): 503s and /readyz names it. Once it has been
    silent for ``[enclave] hang_timeout``, signd serve kills it and starts a new one by itself,
    and every key signs again."""
    extra = FAST_FAILURE.replace("[enclave]\n", f"[enclave]\nhang_timeout = {HANGS_AFTER:g}\n")
    home = make_home(tmp_path / "home", custody=("enclave",), extra=extra)
    with serving(home) as (server, api):
        keys = api.created(8)
        enclave = enclave_pid(server, home)
        with Load(server, home, keys) as load:
            time.sleep(0.5)
            os.kill(enclave, signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                # SIGSTOP takes effect when each thread next leaves the kernel: one finishing a
                # write may still answer a request sent at once (a 200 seen in a loaded run)
                wait_until(lambda: stopped_whole(enclave), timeout=5.0, what="all stopped")
                assert "enclave" in quick_503(lambda: api.sign(keys[0]))["message"]
                quick_503(api.create)
                not_ready_because(api, "enclave")
                load.met_the_fault()
                assert time.monotonic() - stopped < HANGS_AFTER, "the checks came too late"
                assert process_state(enclave) == "T"  # still there, stuck
                wait_for_replacement(server.process.pid, f"--home {home} enclave", enclave)
            finally:
                if process_state(enclave) == "T":  # not replaced: do not leave it behind
                    os.kill(enclave, signal.SIGKILL)
            wait_until_ready(api)
            time.sleep(0.5)
        load.check(saw_fault=True, enclave_restarted=True)
        no_key_lost(api, keys + load.created)
        assert enclave_pid(server, home) != enclave
        log = server.log.read_text()
    assert f"the local enclave process (pid {enclave}) has not answered for" in log


def test_a_killed_enclave_is_replaced_under_load(tmp_path: Path) -> None:
    """SIGKILL with requests in flight: they are retried on a new enclave or answer 503."""
    home = make_home(tmp_path / "home", custody=("enclave",), extra=FAST_FAILURE)
    with serving(home) as (server, api):
        keys = api.created(8)
        with Load(server, home, keys) as load:
            for _ in range(2):
                time.sleep(0.5)
                enclave = enclave_pid(server, home)
                os.kill(enclave, signal.SIGKILL)
                wait_for_replacement(server.process.pid, f"--home {home} enclave", enclave)
            time.sleep(1.0)
        load.check(saw_fault=False, enclave_restarted=True)
        assert api.readyz().status_code == 200
        no_key_lost(api, keys + load.created)


# --------------------------------------------------------------------------- the metadata store


def test_postgresql_stopped_answers_503_and_readyz_names_it_until_it_is_back(
    tmp_path: Path,
) -> None:
    with postgres_server() as postgres:
        metadata = (
            f'[metadata]\ntype = "postgres"\ndsn = "{postgres.create_schema()}"\ntimeout = 2\n\n'
        )
        home = make_home(tmp_path / "home", custody=("enclave",), extra=metadata + FAST_FAILURE)
        with serving(home) as (server, api):
            keys = api.created(8)
            never_looked_up = api.created(1)
            assert api.sign(keys[0]).status_code == 200
            with Load(server, home, keys) as load:
                time.sleep(0.5)
                postgres.stop()
                try:
                    # A key's record never changes: one the service has looked up signs on
                    # from memory; one it has not answers 503 naming the store.
                    assert api.sign(keys[0]).status_code == 200
                    unknown = never_looked_up[0]
                    assert "PostgreSQL" in quick_503(lambda: api.sign(unknown))["message"]
                    assert "PostgreSQL" in quick_503(api.create)["message"]
                    not_ready_because(api, "PostgreSQL")
                    load.met_the_fault()
                finally:
                    postgres.start()
                wait_until_ready(api)
                time.sleep(0.5)
            load.check(saw_fault=True)
            no_key_lost(api, keys + never_looked_up + load.created)


def test_sqlite_locked_by_another_writer_refuses_creation_with_503(tmp_path: Path) -> None:
    """Another process holds SQLite's write lock longer than the busy timeout: key creation
    answers 503 (signing only reads and goes on); once the lock is released, all is well."""
    home = make_home(tmp_path / "home", custody=("enclave",), extra=FAST_FAILURE)
    with serving(home) as (server, api):
        keys = api.created(8)
        with Load(server, home, keys) as load:
            time.sleep(0.5)
            other = sqlite3.connect(home / "metadata.db", isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")
                assert "SQLite" in quick_503(api.create)["message"]
                assert api.sign(keys[0]).status_code == 200
                load.met_the_fault()
            finally:
                other.rollback()
                other.close()
            time.sleep(0.5)
        load.check(saw_fault=True)
        assert api.readyz().status_code == 200
        no_key_lost(api, keys + load.created)
