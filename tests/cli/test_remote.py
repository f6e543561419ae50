"""``signd --url``: the key and sign commands against a running ``signd serve`` (first run:
the development client and policy), SIGHUP reloads, and ``signd audit verify``."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from typer.testing import CliRunner

from signd.cli.context import state
from signd.cli.main import app
from tests.api.conftest import make_home
from tests.api.processes import SigndProcess, signd_serve

pytestmark = pytest.mark.integration

RECIPIENT = "0x3535353535353535353535353535353535353535"


def run(home: Path, *args: str, env: dict[str, str] | None = None, ok: bool = True) -> Any:
    state.close()
    result = CliRunner().invoke(app, ["--home", str(home), *args], env=env)
    state.close()
    assert result.exit_code == (0 if ok else 1), result.output
    return json.loads(result.stdout) if result.stdout.strip().startswith("{") else result


def wait_for_log(server: SigndProcess, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + 15
    while server.log.read_text().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{server.log.read_text()}"
        time.sleep(0.05)


def tx_file(folder: Path, chain_id: int, nonce: int = 0) -> str:
    path = folder / f"tx-{chain_id}-{nonce}.json"
    tx = {
        "type": "0x2",
        "chainId": hex(chain_id),
        "nonce": hex(nonce),
        "to": RECIPIENT,
        "value": hex(10**15),
        "gas": hex(21000),
        "maxFeePerGas": hex(30 * 10**9),
        "maxPriorityFeePerGas": hex(10**9),
    }
    path.write_text(json.dumps(tx))
    return str(path)


def test_the_cli_goes_through_the_service_with_the_development_client(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    key_file = home / "dev-client.key"
    with signd_serve(home, provision=False) as server:
        remote = ["--url", server.url, "--client-id", "dev", "--client-key", str(key_file)]
        banner = server.log.read_text()
        assert "DEVELOPMENT CLIENT AND POLICY (written now, on first run)" in banner
        assert "blind signing (POST /v1/sign/hash): disabled on this server" in banner
        assert "its policy allows BLIND SIGNING (raw hashes), which this server refuses" in banner
        assert "IS ON" not in banner
        assert f"signd --url {server.url} --client-id dev --client-key {key_file}" in banner
        assert "PRIVATE KEY" not in banner and key_file.stat().st_mode & 0o777 == 0o600

        key = run(home, *remote, "keys", "new", "--json", "--label", "hot")["keys"][0]
        assert (
            run(home, *remote, "keys", "show", key["address"], "--json")["key_id"]
            == (key["key_id"])
        )
        # a key reference is one path segment, "%", "/" and ".." included, signed as sent
        odd = run(home, *remote, "keys", "show", "x%2F..#frag", "--json", ok=False)["error"]
        assert odd["code"] == "key_not_found" and "'x%2F..#frag'" in odd["message"]
        up = run(home, *remote, "keys", "show", "../../healthz", "--json", ok=False)["error"]
        assert up["code"] == "not_found"
        listed = run(home, *remote, "keys", "list", "--json")["keys"]
        assert [k["key_id"] for k in listed] == [key["key_id"]]

        signed = run(home, *remote, "sign", "eth-tx", "--key", key["address"], "--file",
                     tx_file(tmp_path, 1))  # fmt: skip
        raw = signed["raw_transaction"]
        assert Account.recover_transaction(raw) == key["address"] == signed["from"]

        env = {"SIGND_URL": server.url, "SIGND_CLIENT_ID": "dev", "SIGND_CLIENT_KEY": str(key_file)}
        message = run(home, "sign", "eth-message", "--key", key["address"], "--text", "hi", env=env)
        assert message["v"] in (27, 28)

        refused = run(home, *remote, "sign", "eth-tx", "--key", key["address"], "--file",
                      tx_file(tmp_path, 5), "--json", ok=False)  # fmt: skip
        assert refused["error"]["code"] == "policy_denied"
        assert refused["error"]["rule"] == "dev-transactions"

        # SIGHUP: a good policy takes effect, a bad one is refused and the good one stays
        policy = home / "policy.toml"
        policy.write_text(policy.read_text().replace("chain_ids = [1, 11155111, 31337]\nallow",
                                                     "chain_ids = [31337]\nallow"))  # fmt: skip
        server.process.send_signal(signal.SIGHUP)
        wait_for_log(server, "reloaded the clients and policy files")
        sign_1: Callable[..., Any] = lambda ok: run(  # noqa: E731
            home, *remote, "sign", "eth-tx", "--key", key["address"], "--file",
            tx_file(tmp_path, 1), "--json", ok=ok)  # fmt: skip
        assert sign_1(False)["error"]["code"] == "policy_denied"
        policy.write_text("version = 1\n[[rules]]\nname = 'half a rule'\n")
        server.process.send_signal(signal.SIGHUP)
        wait_for_log(server, "reload refused, the files in force stay")
        assert sign_1(False)["error"]["code"] == "policy_denied"
        assert run(home, *remote, "sign", "eth-tx", "--key", key["address"], "--file",
                   tx_file(tmp_path, 31337))["from"] == key["address"]  # fmt: skip

        local_only = run(home, *remote, "keys", "export", key["key_id"],
                         "--unsafe-export-private-key", "--json", ok=False)  # fmt: skip
        assert local_only["error"]["code"] == "unsupported_operation"
        assert server.stop() == 0

    log = server.log.read_text()
    assert "policy loaded, sha256" in log and "clients loaded, sha256" in log
    verified = run(home, "audit", "verify", "--json")
    assert verified["ok"] and verified["records"] >= 6


def test_the_development_banner_says_whether_this_server_signs_raw_hashes(tmp_path: Path) -> None:
    from signd.cli.serve import dev_client_usage

    key = tmp_path / "dev-client.key"
    served = dev_client_usage("http://h:1", "dev", key, created=True, blind_served=True)
    refused = dev_client_usage("http://h:1", "dev", key, created=True, blind_served=False)
    assert "BLIND SIGNING (raw hashes) IS ON for it" in served
    assert "IS ON" not in refused and "unless started with --allow-blind-signing" in refused
