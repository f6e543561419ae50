"""End to end with real clients: a hardhat node, ``signd serve --downstream`` in front of it,
and web3.py and ethers.js using signd as if it were the node.

Skipped when node/npm (or the npm registry, for the first ``npm ci``) is not available,
except under ``CI``, where that is a failure.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from web3 import Web3

from tests.api.conftest import PASSPHRASE, make_home
from tests.api.processes import (
    AUTH,
    E2E_DIR,
    TEST_TOKEN,
    SigndProcess,
    hardhat_node,
    rpc_call,
    signd_serve,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HARDHAT_ACCOUNT = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
"""Hardhat's first default account: funded and unlocked on the node (not in signd)."""
RECIPIENT = "0x3535353535353535353535353535353535353535"


@pytest.fixture(scope="module")
def node_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with hardhat_node(tmp_path_factory.mktemp("hardhat")) as url:
        yield url


@pytest.fixture(scope="module")
def signd(tmp_path_factory: pytest.TempPathFactory, node_url: str) -> Iterator[SigndProcess]:
    home = make_home(tmp_path_factory.mktemp("signd") / "home", ("enclave", "keystore"))
    with signd_serve(home, "--downstream", node_url) as server:
        yield server


def new_funded_address(signd: SigndProcess, node_url: str, custody: str) -> str:
    response = httpx.post(
        f"{signd.url}/v1/keys",
        json={"chain": "ethereum", "custody": custody},
        timeout=30,
        headers=AUTH,
    )
    assert response.status_code == 201, response.text
    address: str = response.json()["keys"][0]["address"]
    funding = {"from": HARDHAT_ACCOUNT, "to": address, "value": hex(10 * 10**18)}
    answer = rpc_call(node_url, "eth_sendTransaction", [funding])
    assert "result" in answer, answer
    return address


def test_web3_sends_eip1559_and_legacy_transactions_through_signd(
    signd: SigndProcess, node_url: str
) -> None:
    address = new_funded_address(signd, node_url, "enclave")
    w3 = Web3(Web3.HTTPProvider(signd.rpc_url, request_kwargs={"timeout": 30, "headers": AUTH}))
    assert w3.eth.chain_id == 31337
    assert address in w3.eth.accounts
    before = w3.eth.get_balance(RECIPIENT)

    sent: list[dict[str, Any]] = []
    for extra in ({}, {"type": 0}):
        tx_hash = w3.eth.send_transaction(
            {"from": address, "to": RECIPIENT, "value": 1234, **extra}
        )  # type: ignore[typeddict-item]
        receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30)
        assert receipt["status"] == 1
        assert receipt["from"] == address
        sent.append(dict(w3.eth.get_transaction(tx_hash)))

    assert [tx["type"] for tx in sent] == [2, 0]
    assert sent[0]["maxFeePerGas"] > sent[0]["maxPriorityFeePerGas"] > 0
    assert sent[1]["gasPrice"] > 0
    assert [tx["nonce"] for tx in sent] == [0, 1]
    assert w3.eth.get_balance(RECIPIENT) == before + 2468


def test_ethers_sends_and_signs_typed_data_through_signd(
    signd: SigndProcess, node_url: str
) -> None:
    address = new_funded_address(signd, node_url, "keystore")
    node = shutil.which("node")
    assert node is not None
    result = subprocess.run(
        [node, str(E2E_DIR / "ethers_client.js"), signd.rpc_url, address, RECIPIENT, TEST_TOKEN],
        cwd=E2E_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["status"] == 1
    assert report["type"] == 2
    assert report["from"] == address and report["to"] == RECIPIENT
    assert report["typedDataSigner"] == address
    assert report["messageSigner"] == address
    mined = rpc_call(node_url, "eth_getTransactionReceipt", [report["hash"]])["result"]
    assert int(mined["status"], 16) == 1


def test_the_service_logs_one_json_line_per_request(signd: SigndProcess) -> None:
    httpx.get(f"{signd.url}/healthz", headers={"x-request-id": "e2e-probe"}, timeout=10)
    httpx.post(
        signd.rpc_url,
        json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId"},
        headers={"x-request-id": "e2e-rpc", **AUTH},
        timeout=10,
    )
    deadline = time.monotonic() + 10  # the line is written just after the answer is sent
    while True:
        text = signd.log.read_text()
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        by_id = {line.get("request_id"): line for line in lines}
        if {"e2e-probe", "e2e-rpc"} <= by_id.keys() or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert by_id["e2e-probe"]["path"] == "/healthz" and by_id["e2e-probe"]["status"] == 200
    assert by_id["e2e-rpc"]["rpc_methods"] == ["eth_chainId"]
    assert PASSPHRASE not in text
    assert TEST_TOKEN not in text
    assert "every request is authenticated" in text and f"JSON-RPC URL: {signd.rpc_url}" in text
