"""The downstream Ethereum node: calls to it, and filling a transaction from its state.

With a downstream node, signd stands in for the node (like EthSigner's proxy mode): methods
signd does not serve are forwarded, and ``eth_sendTransaction`` gets its missing nonce, gas,
fees and chain id from the node before it is signed and submitted.

The node's URL may carry an API key, so it never appears in an error message or a log line.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Mapping
from typing import Any, Final

import httpx

from signd.api.deadlines import within
from signd.api.errors import DownstreamError
from signd.errors import DependencyUnavailable, InvalidField

DYNAMIC_FEE_FIELDS: Final = ("maxFeePerGas", "maxPriorityFeePerGas")
ESTIMATE_FIELDS: Final = ("from", "to", "value", "data", "input", "accessList")
"""What a gas estimate is asked with: no fees and no nonce, so a caller's fee caps or a future
nonce cannot make the estimate fail."""


def _present(values: Mapping[str, Any], *names: str) -> bool:
    return any(values.get(name) is not None for name in names)


def _quantity(value: object, field: str) -> int:
    """A JSON-RPC quantity (hex string; also a decimal string or an integer, as wallets send)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        try:
            return int(value, 16) if value[:2] in ("0x", "0X") else int(value, 10)
        except ValueError:
            pass
    raise InvalidField(f"{field} must be a hex quantity", field=field)


class Downstream:
    """A JSON-RPC client for one node, with timeouts; errors become signd errors."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._url = url
        self._timeout = timeout
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._ids = itertools.count(1)
        self._chain_id: int | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self._timeout),
                transport=self._transport,
                headers={"content-type": "application/json"},
            )
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def post(self, payload: Any) -> Any:
        """Send one JSON-RPC request (or batch) and return the node's JSON answer, all within
        the timeout (httpx's own timeouts bound each read, not a node that sends slowly)."""
        try:
            async with within(self._timeout):
                response = await self._http().post(self._url, json=payload)
        except (httpx.TimeoutException, TimeoutError):
            raise DependencyUnavailable("the downstream node did not answer in time") from None
        except httpx.HTTPError as exc:
            raise DependencyUnavailable(
                f"the downstream node is unreachable ({type(exc).__name__})"
            ) from None
        try:
            return response.json()
        except ValueError:
            raise DependencyUnavailable(
                f"the downstream node answered HTTP {response.status_code} without JSON"
            ) from None

    async def forward(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Forward a client's request as it is; the node's answer keeps the client's id."""
        answer = await self.post(dict(request))
        if not isinstance(answer, dict):
            raise DependencyUnavailable("the downstream node gave a malformed JSON-RPC answer")
        return answer

    async def call(self, method: str, params: list[Any]) -> Any:
        """Call a method; the node's JSON-RPC error is raised as :class:`DownstreamError`."""
        answer = await self.post(
            {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
        )
        if not isinstance(answer, dict):
            raise DependencyUnavailable("the downstream node gave a malformed JSON-RPC answer")
        error = answer.get("error")
        if isinstance(error, dict):
            raise DownstreamError(error)
        if "result" not in answer:
            raise DependencyUnavailable("the downstream node gave a malformed JSON-RPC answer")
        return answer["result"]

    async def chain_id(self) -> int:
        """The node's chain id (asked once)."""
        if self._chain_id is None:
            self._chain_id = _quantity(await self.call("eth_chainId", []), "chainId")
        return self._chain_id

    async def fill_transaction(self, transaction: Mapping[str, Any]) -> dict[str, Any]:
        """The transaction with missing chainId, nonce, fees and gas taken from the node.

        A given chainId must be the node's. Without fee fields or a type, the transaction is
        EIP-1559 when the latest block has a base fee and legacy otherwise; EIP-1559 fees are
        ``maxPriorityFeePerGas`` = the node's suggestion (``eth_maxPriorityFeePerGas``, else
        the median reward of recent blocks) and ``maxFeePerGas`` = 2 × base fee + priority.
        """
        values = dict(transaction)
        sender = values.get("from")
        if not isinstance(sender, str):
            raise InvalidField("the transaction needs a from address", field="from")
        chain_id = await self.chain_id()
        if values.get("chainId") is None:
            values["chainId"] = hex(chain_id)
        elif _quantity(values["chainId"], "chainId") != chain_id:
            raise InvalidField(
                f"chainId {values['chainId']} is not the downstream node's chain ({chain_id})",
                field="chainId",
            )
        if values.get("nonce") is None:
            values["nonce"] = await self.call("eth_getTransactionCount", [sender, "pending"])
        if self._is_dynamic_fee(values) or (
            values.get("type") is None
            and not _present(values, "gasPrice", "accessList")
            and await self._base_fee() is not None
        ):
            await self._fill_dynamic_fees(values)
        elif values.get("gasPrice") is None:
            values["gasPrice"] = await self.call("eth_gasPrice", [])
        if not _present(values, "gas", "gasLimit"):
            estimate = {name: values[name] for name in ESTIMATE_FIELDS if name in values}
            values["gas"] = await self.call("eth_estimateGas", [estimate])
        return values

    @staticmethod
    def _is_dynamic_fee(values: Mapping[str, Any]) -> bool:
        declared = values.get("type")
        if declared is not None:
            return _quantity(declared, "type") == 2
        return _present(values, *DYNAMIC_FEE_FIELDS)

    async def _base_fee(self) -> int | None:
        block = await self.call("eth_getBlockByNumber", ["latest", False])
        base_fee = block.get("baseFeePerGas") if isinstance(block, dict) else None
        return None if base_fee is None else _quantity(base_fee, "baseFeePerGas")

    async def _priority_fee(self) -> int:
        try:
            return _quantity(await self.call("eth_maxPriorityFeePerGas", []), "priority fee")
        except DownstreamError:
            history = await self.call("eth_feeHistory", [hex(5), "latest", [50]])
            rewards = [
                _quantity(entry[0], "reward")
                for entry in (history or {}).get("reward") or []
                if isinstance(entry, list) and entry
            ]
            if not rewards:
                raise DependencyUnavailable(
                    "the downstream node suggests no priority fee"
                ) from None
            return int(statistics.median(rewards))

    async def _fill_dynamic_fees(self, values: dict[str, Any]) -> None:
        if values.get("maxPriorityFeePerGas") is None:
            priority = await self._priority_fee()
            if values.get("maxFeePerGas") is not None:
                priority = min(priority, _quantity(values["maxFeePerGas"], "maxFeePerGas"))
            values["maxPriorityFeePerGas"] = hex(priority)
        if values.get("maxFeePerGas") is None:
            base_fee = await self._base_fee()
            if base_fee is None:
                raise DependencyUnavailable(
                    "the downstream node's latest block has no base fee (no EIP-1559)"
                )
            priority = _quantity(values["maxPriorityFeePerGas"], "maxPriorityFeePerGas")
            values["maxFeePerGas"] = hex(2 * base_fee + priority)
        if values.get("type") is None:
            values["type"] = "0x2"
