"""``signd serve`` reloading its clients and policy files (SIGHUP) while it serves.

A real ``signd serve``, with keystore custody only (the gate in the server's process) and
with the default enclave custody (the gate in the enclave process).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import make_home
from tests.api.processes import AUTH, TEST_POLICY, SigndProcess, signd_serve
from tests.integration.support import child_pids

pytestmark = pytest.mark.integration

HASH = "0x" + "42" * 32
DESTINATIONS = ", ".join(f'"0x{n:040x}"' for n in range(1, 2001))
LONG_RULE = f"""
[[rules]]
name = "many-destinations"
clients = ["tests"]
key_labels = ["*"]
operations = ["sign:transaction"]
chains = ["ethereum"]
to_allowlist = [{DESTINATIONS}]
"""
CUSTODY = {"keystore": ("keystore",), "enclave": ("enclave", "keystore")}


def _create_key(server: SigndProcess, custody: str) -> str:
    response = httpx.post(
        f"{server.url}/v1/keys",
        json={"chain": "ethereum", "custody": custody},
        timeout=30,
        headers=AUTH,
    )
    assert response.status_code == 201, response.text
    key_id: str = response.json()["keys"][0]["key_id"]
    return key_id


def _sign(server: SigndProcess, key_id: str, timeout: float = 10) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/sign/hash",
        json={"key": key_id, "hash": HASH},
        timeout=timeout,
        headers=AUTH,
    )


def _wait_for_log(server: SigndProcess, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.log.read_text():
        assert time.monotonic() < deadline, server.log.read_text()[-3000:]
        time.sleep(0.05)


@pytest.mark.parametrize("custody", ["keystore", "enclave"])
def test_a_burst_of_sighups_reloads_and_the_service_keeps_serving(
    tmp_path: Path, custody: str
) -> None:
    """Each SIGHUP used to reload inside the signal handler: one arriving during a reload
    ran another inside it, which waited for the lock the first one held, for ever."""
    home = make_home(tmp_path / "home", CUSTODY[custody])
    (home / "policy.toml").write_text(TEST_POLICY + LONG_RULE)  # each reload takes a while
    with signd_serve(home, "--allow-blind-signing") as server:
        key_id = _create_key(server, custody)
        for _ in range(300):  # spread over a moment, so that some arrive during a reload
            server.process.send_signal(signal.SIGHUP)
            time.sleep(0.002)
        health = httpx.get(f"{server.url}/healthz", timeout=10)
        assert health.status_code == 200
        assert _sign(server, key_id).status_code == 200
        _wait_for_log(server, "reloaded the clients and policy files")
        assert "Traceback" not in server.log.read_text()


def test_a_reload_waiting_on_a_stopped_enclave_does_not_stop_the_service(tmp_path: Path) -> None:
    """The reload runs beside the event loop: while it waits on the enclave, health checks
    are answered at once."""
    home = make_home(tmp_path / "home", CUSTODY["enclave"])
    with signd_serve(home, "--allow-blind-signing") as server:
        key_id = _create_key(server, "enclave")
        [enclave] = child_pids(server.process.pid, containing=f"--home {home} enclave")
        os.kill(enclave, signal.SIGSTOP)
        try:
            server.process.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            started = time.monotonic()
            health = httpx.get(f"{server.url}/healthz", timeout=10)
            answered_in = time.monotonic() - started
        finally:
            os.kill(enclave, signal.SIGCONT)
        assert health.status_code == 200
        assert answered_in < 2
        assert _sign(server, key_id, timeout=30).status_code == 200


def _sign_transaction(server: SigndProcess, address: str, value: int) -> httpx.Response:
    transaction = {
        "type": 2,
        "chainId": 1,
        "nonce": 0,
        "to": "0x3535353535353535353535353535353535353535",
        "value": value,
        "gas": 21000,
        "maxFeePerGas": 40 * 10**9,
        "maxPriorityFeePerGas": 2 * 10**9,
    }
    return httpx.post(
        f"{server.url}/v1/sign/ethereum/transaction",
        json={"key": address, "transaction": transaction},
        timeout=30,
        headers=AUTH,
    )


def _restart_enclave(server: SigndProcess, home: Path) -> None:
    [enclave] = child_pids(server.process.pid, containing=f"--home {home} enclave")
    os.kill(enclave, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while child_pids(server.process.pid, containing=f"--home {home} enclave") == [enclave]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Ready again (a new enclave started and configured) before the next request: one that
    # reaches the old connection before the host has read its end is a 503 (docs/API.md).
    while httpx.get(f"{server.url}/readyz", timeout=30).status_code != 200:
        assert time.monotonic() < deadline + 20
        time.sleep(0.1)


def test_a_restarted_enclave_is_given_the_files_in_force_not_an_unsignalled_edit(
    tmp_path: Path,
) -> None:
    """A restarted enclave used to be sent the files as they were on disk: an edit not yet
    signalled (or half written) took effect, looser or broken (every request then failed
    500 configuration_error). Only a reload puts a file in force."""
    home = make_home(tmp_path / "home", CUSTODY["enclave"])
    policy = home / "policy.toml"
    limited = TEST_POLICY.replace(
        'contract_selectors = ["*"]', 'contract_selectors = ["*"]\nmax_value_per_tx = "1000"', 1
    )
    policy.write_text(limited)
    with signd_serve(home) as server:
        response = httpx.post(
            f"{server.url}/v1/keys",
            json={"chain": "ethereum", "custody": "enclave"},
            timeout=30,
            headers=AUTH,
        )
        address = response.json()["keys"][0]["address"]
        assert _sign_transaction(server, address, 10**6).status_code == 403

        policy.write_text(TEST_POLICY)  # looser, and not signalled
        _restart_enclave(server, home)
        refused = _sign_transaction(server, address, 10**6)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["rule"] == "tests-everything"

        policy.write_text("version = 1\n[[rules]]\nname = 'broken'\n")  # not signalled
        _restart_enclave(server, home)
        assert _sign_transaction(server, address, 10).status_code == 200

        policy.write_text(TEST_POLICY)
        server.process.send_signal(signal.SIGHUP)
        _wait_for_log(server, "reloaded the clients and policy files")
        assert _sign_transaction(server, address, 10**6).status_code == 200


def _readyz_reload(server: SigndProcess) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/readyz", timeout=30)
    assert response.status_code == 200, response.text  # the files in force still serve
    reload: dict[str, Any] = response.json()["reload"]
    return reload


def _refused_reloads(server: SigndProcess) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    prefix = 'signd_config_reloads_total{outcome="refused"} '
    return float(next(line for line in text.splitlines() if line.startswith(prefix))[len(prefix) :])


@pytest.mark.parametrize("custody", ["keystore", "enclave"])
def test_a_sighup_takes_both_files_or_neither_and_readyz_says_so(
    tmp_path: Path, custody: str
) -> None:
    """With the gate in the server's process, a good changed policy beside a bad clients
    file used to go into force on its own; and a refused reload showed only in the log."""
    home = make_home(tmp_path / "home", CUSTODY[custody])
    clients, policy = home / "clients.toml", home / "policy.toml"
    with signd_serve(home) as server:
        address = httpx.post(
            f"{server.url}/v1/keys",
            json={"chain": "ethereum", "custody": custody},
            timeout=30,
            headers=AUTH,
        ).json()["keys"][0]["address"]
        in_force = _readyz_reload(server)
        assert in_force["status"] == "loaded"
        good_clients = clients.read_text()
        policy.write_text(
            TEST_POLICY.replace(
                'contract_selectors = ["*"]',
                'contract_selectors = ["*"]\nmax_value_per_tx = "1000"',
                1,
            )
        )
        clients.write_text('version = 1\n[[clients]]\nid = "half"\n')
        server.process.send_signal(signal.SIGHUP)
        _wait_for_log(server, "reload refused, the files in force stay")

        assert _sign_transaction(server, address, 10**6).status_code == 200  # the old policy
        refused = _readyz_reload(server)
        assert refused["status"] == "refused" and refused["reason"] == (
            "clients: refused (the service log says why)"
        )
        assert refused["in_force"] == in_force["in_force"]
        assert refused["at"] > in_force["at"]
        assert _refused_reloads(server) == 1

        clients.write_text(good_clients)
        server.process.send_signal(signal.SIGHUP)
        _wait_for_log(server, "reloaded the clients and policy files")
        limited = _sign_transaction(server, address, 10**6)
        assert limited.status_code == 403, limited.text
        reloaded = _readyz_reload(server)
        assert reloaded["status"] == "reloaded" and "reason" not in reloaded
        assert reloaded["in_force"]["policy_sha256"] != in_force["in_force"]["policy_sha256"]
        assert _refused_reloads(server) == 1
        assert "Traceback" not in server.log.read_text()
