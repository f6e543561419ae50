"""What a signing request would do, in chain-neutral terms the policy can judge.

The enclave builds a :class:`SigningIntent` from what it decoded itself (the transaction it
will hash, the typed data's domain), never from what the host says the request contains.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from signd.errors import InvalidField


class Operation(enum.StrEnum):
    """What a policy rule may allow."""

    KEYS_CREATE = "keys:create"
    SIGN_TRANSACTION = "sign:transaction"
    SIGN_MESSAGE = "sign:message"
    SIGN_TYPED_DATA = "sign:typed_data"
    SIGN_HASH = "sign:hash"


@dataclass(frozen=True, init=False)
class SigningIntent:
    """One request, as the policy sees it.

    - ``key_labels``: the key's labels (for ``keys:create``, the labels asked for).
    - ``chain_id``: the transaction's chain id (``None`` for a pre-EIP-155 transaction), or
      the typed data's domain ``chainId``; ``None`` where there is none.
    - ``to``: the 20-byte destination; ``None`` is a contract creation for
      ``sign:transaction`` and "no destination" for anything else.
    - ``value``: wei moved by the transaction.
    - ``gas`` and ``fee_per_gas``: the transaction's gas limit and the most it pays per unit
      of gas (``gasPrice``, or ``maxFeePerGas`` for EIP-1559), as signed; ``fee`` is their
      product, the worst-case fee in wei. All 0 for anything but a transaction.
    - ``has_data`` and ``data_selector``: whether the call carries data, and its first four
      bytes (``None`` if shorter).
    - ``eip712_domain``: the EIP-712 domain of a ``sign:typed_data`` request as it is
      signed: its non-null fields, ``chainId`` as the integer the digest encodes (an int;
      the policy reads any other chainId as no chain).
    """

    client_id: str
    key_id: str
    key_labels: frozenset[str]
    chain: str
    operation: Operation
    chain_id: int | None
    to: bytes | None
    value: int
    gas: int
    fee_per_gas: int
    fee: int
    data_selector: bytes | None
    has_data: bool
    eip712_domain: Mapping[str, Any] | None

    def __init__(
        self,
        client_id: str,
        key_id: str,
        key_labels: Iterable[str],
        chain: str,
        operation: Operation | str,
        chain_id: int | None = None,
        to: bytes | None = None,
        value: int = 0,
        data_selector: bytes | None = None,
        has_data: bool = False,
        eip712_domain: Mapping[str, Any] | None = None,
        gas: int = 0,
        fee_per_gas: int = 0,
    ) -> None:
        if isinstance(key_labels, str):
            raise InvalidField("key_labels must be a collection of labels", field="key_labels")
        if not isinstance(operation, Operation):
            try:
                operation = Operation(operation)
            except ValueError:
                raise InvalidField(f"unknown operation {operation!r}", field="operation") from None
        if chain_id is not None and (not _is_int(chain_id) or chain_id < 0):
            raise InvalidField("chain_id must be a non-negative integer", field="chain_id")
        if to is not None and (not isinstance(to, bytes) or len(to) != 20):
            raise InvalidField("to must be 20 bytes or None", field="to")
        if not _is_int(value) or value < 0:
            raise InvalidField("value must be a non-negative integer", field="value")
        if not _is_int(gas) or gas < 0:
            raise InvalidField("gas must be a non-negative integer", field="gas")
        if not _is_int(fee_per_gas) or fee_per_gas < 0:
            raise InvalidField("fee_per_gas must be a non-negative integer", field="fee_per_gas")
        if data_selector is not None:
            if not isinstance(data_selector, bytes) or len(data_selector) != 4:
                raise InvalidField("data_selector must be 4 bytes or None", field="data_selector")
            if not has_data:
                raise InvalidField("a data_selector implies has_data", field="data_selector")
        # One update of the instance's dict instead of object.__setattr__ per field (the
        # class is frozen, and not slotted, for this): the gate builds an intent per call.
        self.__dict__.update(
            client_id=client_id,
            key_id=key_id,
            key_labels=frozenset(key_labels),
            chain=chain,
            operation=operation,
            chain_id=chain_id,
            to=to,
            value=value,
            gas=gas,
            fee_per_gas=fee_per_gas,
            fee=gas * fee_per_gas,
            data_selector=data_selector,
            has_data=bool(has_data),
            eip712_domain=None if eip712_domain is None else dict(eip712_domain),
        )

    @property
    def creates_contract(self) -> bool:
        return self.operation is Operation.SIGN_TRANSACTION and self.to is None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
