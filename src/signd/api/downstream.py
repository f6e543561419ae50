"""The downstream Ethereum node: calls to it, and filling a transaction from its state.

With a downstream node, signd stands in for the node (like EthSigner's proxy mode): methods
signd does not serve are forwarded, and ``eth_sendTransaction`` gets its missing nonce, gas,
fees and chain id from the node before it is signed and submitted.

The node's URL may carry an API key, so it never appears in an error message or a log line.

The node is a dependency, not the caller: whatever it answers that is not a JSON-RPC answer,
or not a value it could mean (a nonce that is no hex quantity or is past 2**64, a fee per
gas past 2**128, a block that is no object), is :class:`~signd.errors.DependencyUnavailable`
(JSON-RPC -32006), never the caller's ``invalid_*``. Each call, the whole answer read
included, ends within the timeout, however slowly the node sends.
"""

from __future__ import annotations

import itertools
import re
import statistics
from collections.abc import Mapping
from typing import Any, Final

import httpx

from signd.api.deadlines import within
from signd.api.errors import DownstreamError
from signd.chains.ethereum.transactions import MAX_CHAIN_ID
from signd.errors import DependencyUnavailable, InvalidField

DYNAMIC_FEE_FIELDS: Final = ("maxFeePerGas", "maxPriorityFeePerGas")
ESTIMATE_FIELDS: Final = ("from", "to", "value", "data", "input", "accessList")
"""What a gas estimate is asked with: no fees and no nonce, so a caller's fee caps or a future
nonce cannot make the estimate fail."""
_HEX_QUANTITY: Final = re.compile(r"0[xX][0-9a-fA-F]{1,64}")
UINT64_LIMIT: Final = 2**64
"""Nonces (EIP-2681) and gas are below this."""
NODE_FEE_LIMIT: Final = 2**128
"""Fees per gas a node answers are below this: far past any real one, and small enough that
2 × base fee + a priority fee the node suggested stays a uint256."""


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


def _node_quantity(value: object, what: str, limit: int = NODE_FEE_LIMIT) -> int:
    """A quantity the node answered: a hex string (or an integer) below ``limit``. Anything
    else is the node's fault, not the caller's."""
    number: int | None = None
    if isinstance(value, str) and _HEX_QUANTITY.fullmatch(value):
        number = int(value, 16)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    if number is None or not 0 <= number < limit:
        raise DependencyUnavailable(f"the downstream node answered an invalid {what}")
    return number


def _malformed() -> DependencyUnavailable:
    return DependencyUnavailable("the downstream node gave a malformed JSON-RPC answer")


def _outcome(answer: object) -> tuple[str, Any]:
    """A JSON-RPC answer's ``("result", value)`` or ``("error", error object)``; an answer
    that has neither, both, or an error that is no object with an integer code and a string
    message is malformed."""
    if not isinstance(answer, dict):
        raise _malformed()
    error = answer.get("error")
    if error is None:
        if "result" not in answer:
            raise _malformed()
        return "result", answer["result"]
    code = error.get("code") if isinstance(error, dict) else None
    if (
        not isinstance(code, int)
        or isinstance(code, bool)
        or not isinstance(error.get("message"), str)
        or answer.get("result") is not None
    ):
        raise _malformed()
    return "error", error


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
        """Forward a client's request as it is; the node's result or error, under the
        client's id (a node that answers neither is a malformed answer)."""
        member, value = _outcome(await self.post(dict(request)))
        return {"jsonrpc": "2.0", "id": request.get("id"), member: value}

    async def call(self, method: str, params: list[Any]) -> Any:
        """Call a method; the node's JSON-RPC error is raised as :class:`DownstreamError`."""
        answer = await self.post(
            {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
        )
        member, value = _outcome(answer)
        if member == "error":
            raise DownstreamError(value)
        return value

    async def quantity(
        self, method: str, params: list[Any], what: str, limit: int = NODE_FEE_LIMIT
    ) -> int:
        """Call a method that answers a quantity (:func:`_node_quantity`)."""
        return _node_quantity(await self.call(method, params), what, limit)

    async def chain_id(self) -> int:
        """The node's chain id (asked once)."""
        if self._chain_id is None:
            self._chain_id = await self.quantity("eth_chainId", [], "chain id", MAX_CHAIN_ID + 1)
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
            nonce = await self.quantity(
                "eth_getTransactionCount", [sender, "pending"], "nonce", UINT64_LIMIT
            )
            values["nonce"] = hex(nonce)
        if self._is_dynamic_fee(values) or (
            values.get("type") is None
            and not _present(values, "gasPrice", "accessList")
            and await self._base_fee() is not None
        ):
            await self._fill_dynamic_fees(values)
        elif values.get("gasPrice") is None:
            values["gasPrice"] = hex(await self.quantity("eth_gasPrice", [], "gas price"))
        if not _present(values, "gas", "gasLimit"):
            estimate = {name: values[name] for name in ESTIMATE_FIELDS if name in values}
            gas = await self.quantity("eth_estimateGas", [estimate], "gas estimate", UINT64_LIMIT)
            values["gas"] = hex(gas)
        return values

    @staticmethod
    def _is_dynamic_fee(values: Mapping[str, Any]) -> bool:
        declared = values.get("type")
        if declared is not None:
            return _quantity(declared, "type") == 2
        return _present(values, *DYNAMIC_FEE_FIELDS)

    async def _base_fee(self) -> int | None:
        block = await self.call("eth_getBlockByNumber", ["latest", False])
        if not isinstance(block, dict):
            raise DependencyUnavailable("the downstream node answered no latest block")
        base_fee = block.get("baseFeePerGas")
        return None if base_fee is None else _node_quantity(base_fee, "base fee")

    async def _priority_fee(self) -> int:
        try:
            return await self.quantity("eth_maxPriorityFeePerGas", [], "priority fee")
        except DownstreamError:
            history = await self.call("eth_feeHistory", [hex(5), "latest", [50]])
            if not isinstance(history, dict) or not isinstance(history.get("reward") or [], list):
                raise DependencyUnavailable(
                    "the downstream node answered an invalid fee history"
                ) from None
            rewards = [
                _node_quantity(entry[0], "reward")
                for entry in history.get("reward") or []
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
