"""``signd serve`` as a process: the banner, settings from flags and signd.toml, graceful stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from signd.cli.serve import SHUTDOWN_ANSWER_TIME, SHUTDOWN_GRACE
from tests.api.conftest import PASSPHRASE, make_home, open_signer
from tests.api.processes import AUTH, SIGND_MAIN, logged_statuses, signd_serve
from tests.integration.support import child_pids

pytestmark = pytest.mark.integration

HASH = "0x" + "42" * 32


def test_serve_flags_banner_and_graceful_shutdown(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    downstream = "http://127.0.0.1:9/v3/very-secret-api-key"
    with signd_serve(home, "--allow-blind-signing", "--downstream", downstream) as server:
        key = httpx.post(
            f"{server.url}/v1/keys",
            json={"chain": "ethereum", "custody": "keystore"},
            timeout=30,
            headers=AUTH,
        ).json()["keys"][0]
        signed = httpx.post(
            f"{server.url}/v1/sign/hash",
            json={"key": key["key_id"], "hash": HASH},
            timeout=30,
            headers=AUTH,
        )
        assert signed.status_code == 200
        down = httpx.post(
            server.rpc_url,
            json={"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber"},
            timeout=30,
            headers=AUTH,
        )
        assert down.status_code == 200
        assert down.json()["error"]["data"]["code"] == "dependency_unavailable"
        assert server.stop() == 0
        log = server.log.read_text()
    assert "blind signing (POST /v1/sign/hash): ENABLED" in log
    assert "downstream node: http://127.0.0.1:9" in log
    assert "very-secret-api-key" not in log
    assert "Shutting down" in log or "Finished server process" in log
    assert f"the home {home} is open to group or others (mode 755)" in log  # made by mkdir


def test_serve_reads_the_api_table_and_refuses_blind_signing_by_default(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home", extra="\n[api]\nchain_id = 5\nmax_batch = 2\n")
    with signd_serve(home) as server:
        key = httpx.post(
            f"{server.url}/v1/keys",
            json={"chain": "ethereum", "custody": "keystore"},
            timeout=30,
            headers=AUTH,
        ).json()["keys"][0]
        refused = httpx.post(
            f"{server.url}/v1/sign/hash",
            json={"key": key["key_id"], "hash": HASH},
            timeout=30,
            headers=AUTH,
        )
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "blind_signing_disabled"
        chain = httpx.post(
            server.rpc_url,
            json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId"},
            timeout=30,
            headers=AUTH,
        )
        assert chain.json()["result"] == "0x5"
        document = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
        assert (
            document["components"]["schemas"]["BatchRequest"]["properties"]["requests"]["maxItems"]
            == 2
        )


def serve_that_fails(home: Path, passphrase: str) -> subprocess.CompletedProcess[str]:
    """``signd serve`` on ``home`` that stops at start-up with exit status 1."""
    result = subprocess.run(
        [sys.executable, "-c", SIGND_MAIN, "--home", str(home), "serve", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SIGND_KEYSTORE_PASSPHRASE": passphrase},
        check=False,
    )
    assert result.returncode == 1, result.stderr
    return result


def test_serve_refuses_an_unknown_api_setting(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home", extra="\n[api]\nallow_everything = true\n")
    assert "allow_everything" in serve_that_fails(home, PASSPHRASE).stderr


def test_serve_with_a_wrong_passphrase_says_so_in_one_line(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    with open_signer(home) as signer:  # creates the keystore with PASSPHRASE
        signer.backend("keystore")
    result = serve_that_fails(home, "not the passphrase")
    assert "error wrong_passphrase: the passphrase does not open this keystore" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


SERVE_AND_LOOK_AT_THE_ENVIRONMENT = """
import os, subprocess, sys
import signd.cli.serve
from signd.cli.context import state

class StartedServer:
    started = True

    def run(self):
        show = "import os; print(os.environ.get('SIGND_KEYSTORE_PASSPHRASE'))"
        child = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True)
        state.signer.close()
        state.signer.backend("keystore")  # opened again, without the variable
        print("own:", os.environ.get("SIGND_KEYSTORE_PASSPHRASE"), "child:", child.stdout.strip())

signd.cli.serve._server = lambda config, adapter, requests: StartedServer()
"""


def test_serve_takes_the_passphrase_out_of_its_environment_once_the_keystore_has_it(
    tmp_path: Path,
) -> None:
    """So that the processes it starts later do not inherit it (its own /proc/<pid>/environ,
    the kernel's copy from exec, still shows it)."""
    home = make_home(tmp_path / "home")
    program = SERVE_AND_LOOK_AT_THE_ENVIRONMENT + SIGND_MAIN
    result = subprocess.run(
        [sys.executable, "-c", program, "--home", str(home), "serve", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SIGND_KEYSTORE_PASSPHRASE": PASSPHRASE},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "own: None child: None" in result.stdout


def test_serve_with_embedded_defaults_and_no_passphrase(tmp_path: Path) -> None:
    """README's first command: an empty home, no passphrase, no terminal. signd serves enclave
    custody with its gate in the enclave, and the development client it prints works."""
    from eth_account import Account
    from eth_account.messages import encode_defunct

    from signd.client import SigndClient

    home = tmp_path / "home"
    with signd_serve(home, provision=False, passphrase=False) as server:
        ready = httpx.get(f"{server.url}/readyz", timeout=30)
        assert ready.status_code == 200, ready.text
        parts = {part["part"] for part in ready.json()["parts"]}
        assert parts == {"custody:enclave", "attestation", "audit"}
        client = SigndClient(server.url, "dev", str(home / "dev-client.key"))
        try:
            key = client.create_keys(chain="ethereum", custody="enclave")[0]
            signed = client.sign_eth_message(key.address, b"hello")
        finally:
            client.close()
        recovered = Account.recover_message(encode_defunct(b"hello"), signature=signed.signature)
        assert recovered == key.address
        assert server.stop() == 0
        log = server.log.read_text()
    assert "keystore custody is off: no passphrase" in log
    assert "gate: in the enclave" in log
    assert "signd --url" in log


def test_a_client_gone_in_the_middle_of_its_body_is_logged_as_499_not_as_a_crash(
    tmp_path: Path,
) -> None:
    home = make_home(tmp_path / "home")
    with signd_serve(home, "--allow-blind-signing") as server:
        port = int(server.url.rsplit(":", 1)[1])
        for path in ("/v1/sign/hash", "/rpc"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
                head = (
                    f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Authorization: {AUTH['authorization']}\r\n"
                    "Content-Type: application/json\r\nContent-Length: 500\r\n\r\n"
                )
                connection.sendall(head.encode() + b'{"key": "0x')
                time.sleep(0.3)  # the server is waiting for the rest of the body
        statuses = logged_statuses(server, "/v1/sign/hash", "/rpc")
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        log = server.log.read_text()
    assert (statuses["/v1/sign/hash"], statuses["/rpc"]) == ([499], [499])
    assert 'code="client_disconnected"' in metrics
    assert "unhandled error" not in log
    assert "Traceback" not in log


def test_a_home_closed_to_group_and_others_is_not_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from signd.cli.serve import _warn_if_home_is_open

    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    _warn_if_home_is_open(home)
    home.chmod(0o750)
    _warn_if_home_is_open(home)
    assert [record.getMessage() for record in caplog.records] == [
        f"the home {home} is open to group or others (mode 750): run chmod 700 {home}"
    ]


@pytest.mark.parametrize("custody", ["keystore", "enclave"])
def test_serve_makes_a_missing_audit_log_folder_with_either_gate(
    tmp_path: Path, custody: str
) -> None:
    """``[api] audit_log`` in a folder that does not exist yet: the gate in this process
    (keystore custody) and the enclave's gate (enclave custody) both make it, and say so."""
    folder = tmp_path / "audit" / "signd"
    home = make_home(
        tmp_path / "home", (custody,), extra=f'\n[api]\naudit_log = "{folder}/audit.log"\n'
    )
    with signd_serve(home) as server:
        ready = httpx.get(f"{server.url}/readyz", timeout=30)
        assert ready.status_code == 200, ready.text
        assert server.stop() == 0
    assert (folder / "audit.log").is_file()
    assert f"made the folder {folder}" in server.log.read_text()


@pytest.mark.parametrize("custody", ["keystore", "enclave"])
def test_serve_with_an_audit_log_it_cannot_open_says_so_in_one_line(
    tmp_path: Path, custody: str
) -> None:
    """A folder that cannot be made (a file is in the way): a configuration error naming the
    audit log, not a traceback, with either gate."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    home = make_home(
        tmp_path / "home", (custody,), extra=f'\n[api]\naudit_log = "{blocker}/audit.log"\n'
    )
    result = serve_that_fails(home, PASSPHRASE)
    assert "error configuration_error: cannot open the audit log" in result.stderr, result.stderr
    assert str(blocker / "audit.log") in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_requests_still_running_at_the_end_of_the_shutdown_grace_are_answered_503(
    tmp_path: Path,
) -> None:
    """SIGTERM while requests wait on a node that never answers and on a stopped enclave:
    once the grace period is over they are answered 503 dependency_unavailable (JSON, and
    JSON-RPC on /rpc with the request's id, whether it was authenticated or still waiting to
    be), not cut off by uvicorn's plain-text 500, and signd still exits 0."""
    home = make_home(
        tmp_path / "home", ("enclave", "keystore"), extra="\n[api]\ndownstream_timeout = 60\n"
    )
    with socket.socket() as silent_node, ThreadPoolExecutor(3) as pool:
        silent_node.bind(("127.0.0.1", 0))
        silent_node.listen()  # connections are queued, never accepted: no answer ever
        node = f"http://127.0.0.1:{silent_node.getsockname()[1]}"
        with signd_serve(home, "--allow-blind-signing", "--downstream", node) as server:
            key = httpx.post(
                f"{server.url}/v1/keys",
                json={"chain": "ethereum", "custody": "enclave"},
                timeout=30,
                headers=AUTH,
            ).json()["keys"][0]
            forwarded = pool.submit(
                httpx.post,
                server.rpc_url,
                json={"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber"},
                timeout=60,
                headers=AUTH,
            )
            time.sleep(1)  # authenticated by the enclave, now waiting on the node
            [enclave] = child_pids(server.process.pid, containing=f"--home {home} enclave")
            os.kill(enclave, signal.SIGSTOP)
            try:
                signing = pool.submit(
                    httpx.post,
                    f"{server.url}/v1/sign/hash",
                    json={"key": key["key_id"], "hash": HASH},
                    timeout=60,
                    headers=AUTH,
                )
                waiting = pool.submit(  # on the enclave, to authenticate it
                    httpx.post,
                    server.rpc_url,
                    json={"jsonrpc": "2.0", "id": "waits", "method": "eth_accounts"},
                    timeout=60,
                    headers=AUTH,
                )
                time.sleep(0.5)
                started = time.monotonic()
                server.process.send_signal(signal.SIGTERM)
                rest, rpc = signing.result(timeout=60), forwarded.result(timeout=60)
                authenticating = waiting.result(timeout=60)
                answered_after = time.monotonic() - started
            finally:
                os.kill(enclave, signal.SIGCONT)
            assert server.process.wait(timeout=30) == 0
            log = server.log.read_text()
    assert SHUTDOWN_GRACE <= answered_after < SHUTDOWN_GRACE + SHUTDOWN_ANSWER_TIME
    assert rest.status_code == 503, rest.text
    assert rest.json()["error"]["code"] == "dependency_unavailable"
    assert "shutting down" in rest.json()["error"]["message"]
    for answer, request_id in ((rpc, 1), (authenticating, "waits")):
        assert answer.status_code == 503, answer.text
        assert answer.json()["id"] == request_id  # it was null, as if no request was read
        assert answer.json()["error"]["code"] == -32006
        assert answer.json()["error"]["data"] == {"code": "dependency_unavailable"}
        assert "shutting down" in answer.json()["error"]["message"]
    assert "Exception in ASGI application" not in log
    assert "stopping 3 request(s) still running" in log


def test_a_json_rpc_request_the_stopped_enclave_cannot_authenticate_keeps_its_id(
    tmp_path: Path,
) -> None:
    """The enclave that authenticates every request stopped (SIGSTOP): a single JSON-RPC
    request gets 503 with the -32006 error and its own id (it got ``"id": null``), and once
    the enclave goes on, the same request is answered, without a restart."""
    home = make_home(tmp_path / "home", ("enclave",), extra="\n[enclave]\ntimeout = 2\n")
    call = {"jsonrpc": "2.0", "id": 7, "method": "eth_accounts"}
    with signd_serve(home) as server:
        assert httpx.post(server.rpc_url, json=call, timeout=30, headers=AUTH).json() == {
            "jsonrpc": "2.0",
            "id": 7,
            "result": [],
        }
        [enclave] = child_pids(server.process.pid, containing=f"--home {home} enclave")
        os.kill(enclave, signal.SIGSTOP)
        try:
            refused = httpx.post(server.rpc_url, json=call, timeout=30, headers=AUTH)
        finally:
            os.kill(enclave, signal.SIGCONT)
        assert refused.status_code == 503, refused.text
        answer = refused.json()
        assert answer["id"] == 7, answer
        assert answer["error"]["code"] == -32006, answer
        assert answer["error"]["data"] == {"code": "dependency_unavailable"}
        assert "enclave" in answer["error"]["message"]
        again = httpx.post(server.rpc_url, json=call, timeout=30, headers=AUTH)
        assert again.status_code == 200 and again.json()["result"] == [], again.text
