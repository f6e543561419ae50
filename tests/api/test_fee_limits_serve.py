"""Fee limits end to end: ``signd serve --downstream`` with the gate in its enclave, in front of
a node that lies about fees.

The host fills the fees and gas a caller leaves out from its node; the enclave judges the
transaction with those fills applied, so a node (or a host) that fills an absurd fee gets the
transaction refused by the rule's ``max_fee_per_tx``, audited, and never sent.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from signd.chains.ethereum.transactions import decode_transaction
from tests.api.conftest import make_home
from tests.api.processes import AUTH, signd_serve

pytestmark = pytest.mark.integration

CHAIN_ID = 1
GWEI = 10**9
HONEST_PRICE = 30 * GWEI
ABSURD_PRICE = 10**24
"""What a probe once got signed: a gas price of a million ether per unit of gas."""
MAX_FEE_PER_TX = 21_000 * 100 * GWEI
RECIPIENT = "0x" + "35" * 20
POLICY = f"""\
version = 1

[[rules]]
name = "tests-keys"
clients = ["tests"]
key_labels = ["*"]
operations = ["keys:create"]
chains = ["ethereum"]

[[rules]]
name = "capped-fees"
clients = ["tests"]
key_labels = ["*"]
operations = ["sign:transaction"]
chains = ["ethereum"]
chain_ids = [{CHAIN_ID}]
max_fee_per_tx = "{MAX_FEE_PER_TX}"
"""


@dataclass
class LyingNode:
    """A JSON-RPC node on 127.0.0.1 whose fee suggestions are whatever the test sets."""

    gas_price: int = HONEST_PRICE
    base_fee: int | None = None
    """``None``: a pre-London node (legacy transactions)."""
    sent: list[str] = field(default_factory=list)

    def answer(self, method: str, params: list[Any]) -> Any:
        answers: dict[str, Any] = {
            "eth_chainId": hex(CHAIN_ID),
            "eth_getTransactionCount": "0x0",
            "eth_gasPrice": hex(self.gas_price),
            "eth_maxPriorityFeePerGas": hex(GWEI),
            "eth_estimateGas": hex(21_000),
            "eth_getBlockByNumber": {"number": "0x10"}
            | ({} if self.base_fee is None else {"baseFeePerGas": hex(self.base_fee)}),
        }
        if method == "eth_sendRawTransaction":
            self.sent.append(params[0])
            return "0x" + "00" * 32
        return answers[method]


@pytest.fixture
def node() -> Iterator[tuple[LyingNode, str]]:
    lying = LyingNode()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            call = json.loads(self.rfile.read(int(self.headers["content-length"])))
            result = lying.answer(call["method"], call.get("params", []))
            body = json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": result}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield lying, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def send(url: str, tx: dict[str, Any]) -> dict[str, Any]:
    request = {"jsonrpc": "2.0", "id": 1, "method": "eth_sendTransaction", "params": [tx]}
    answer: dict[str, Any] = httpx.post(url, json=request, headers=AUTH, timeout=30).json()
    return answer


def test_an_absurd_fee_filled_by_the_node_is_refused_in_the_enclave(
    tmp_path: Path, node: tuple[LyingNode, str]
) -> None:
    lying, node_url = node
    home = make_home(tmp_path / "home", ("enclave", "keystore"))
    (home / "policy.toml").write_text(POLICY)
    with signd_serve(home, "--downstream", node_url) as server:
        assert "gate: in the enclave" in server.log.read_text()
        created = httpx.post(
            f"{server.url}/v1/keys",
            json={"chain": "ethereum", "custody": "enclave"},
            headers=AUTH,
            timeout=30,
        )
        assert created.status_code == 201, created.text
        address = created.json()["keys"][0]["address"]
        asked = {"from": address, "to": RECIPIENT, "value": "0x1"}  # no gas, no fees

        # an honest node's fill is within the cap: signed and sent as filled
        assert "result" in send(server.rpc_url, asked)
        [raw] = lying.sent
        signed = decode_transaction(bytes.fromhex(raw[2:])).transaction
        assert signed.fee_per_gas == HONEST_PRICE and signed.gas == 21_000

        # a gas price of 10**24 wei, then a base fee that makes maxFeePerGas absurd
        for gas_price, base_fee, kind in (
            (ABSURD_PRICE, None, "legacy"),
            (HONEST_PRICE, ABSURD_PRICE, "EIP-1559"),
        ):
            lying.gas_price, lying.base_fee = gas_price, base_fee
            error = send(server.rpc_url, asked)["error"]
            assert error["code"] == -32003, (kind, error)
            assert error["data"] == {"code": "policy_denied", "rule": "capped-fees"}
            assert f"exceeds max_fee_per_tx {MAX_FEE_PER_TX}" in error["message"], error
            assert error["message"].startswith("rule capped-fees: fee ")
            last = json.loads((home / "audit.log").read_text().splitlines()[-1])["record"]
            assert (last["decision"], last["rule"]) == ("refused", "capped-fees")
            assert "max_fee_per_tx" in last["reason"]
        assert len(lying.sent) == 1  # nothing refused reached the node
