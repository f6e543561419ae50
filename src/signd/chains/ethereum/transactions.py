"""Ethereum transactions: legacy (with and without EIP-155), EIP-2930 and EIP-1559.

Each type is a table of fields in RLP order; the same table drives parsing wallet JSON,
RLP encoding and decoding, and JSON output. A transaction knows the digest to sign
(:meth:`UnsignedTransaction.signing_digest`) and how to attach a signature
(:meth:`UnsignedTransaction.assemble`); it never sees a key.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Generic, TypeAlias, TypeVar

from signd.chains.ethereum.address import (
    address_from_public_key,
    parse_address,
    to_checksum_address,
)
from signd.chains.ethereum.encoding import (
    RLPItem,
    decode_bytes,
    decode_int,
    decode_list,
    int_to_bytes,
    is_hex,
    rlp_decode,
    rlp_encode,
)
from signd.crypto.hashing import keccak256
from signd.crypto.secp256k1 import RecoverableSignature
from signd.errors import InvalidField, InvalidSignature, InvalidTransaction

T = TypeVar("T")

StorageKeys: TypeAlias = tuple[bytes, ...]
AccessList: TypeAlias = tuple[tuple[bytes, StorageKeys], ...]
"""(20-byte address, (32-byte storage key, ...)) pairs."""

_REQUIRED: Final[Any] = object()
_ALIASES: Final = {"gasLimit": "gas", "input": "data"}


def _hex_bytes(value: object, field: str, size: int | None = None) -> bytes:
    """``0x``-prefixed hex (even length) to bytes, of exactly ``size`` bytes when given."""
    if not isinstance(value, str) or value[:2] != "0x" or len(value) % 2 or not is_hex(value[2:]):
        raise InvalidField(f"{field} must be 0x-prefixed hex with an even length", field=field)
    data = bytes.fromhex(value[2:])
    if size is not None and len(data) != size:
        raise InvalidField(f"{field} must be {size} bytes", field=field)
    return data


class FieldKind(ABC, Generic[T]):
    """How one kind of value reads from wallet JSON, writes to RLP, reads back, and prints."""

    @abstractmethod
    def parse(self, value: object, field: str) -> T: ...

    @abstractmethod
    def encode(self, value: T) -> RLPItem: ...

    @abstractmethod
    def decode(self, item: RLPItem, field: str) -> T: ...

    @abstractmethod
    def to_json(self, value: T) -> Any: ...


class Quantity(FieldKind[int]):
    """A non-negative integer below ``2**bits``: JSON hex string, decimal string or int."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.limit = 1 << bits

    def parse(self, value: object, field: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise InvalidField(
                f"{field} must be a hex string or a non-negative integer", field=field
            )
        if isinstance(value, str):
            if len(value) > 2 and value[:2] == "0x" and is_hex(value[2:]):
                number = int(value, 16)
            elif value.isascii() and value.isdigit():
                try:
                    number = int(value)
                except ValueError:
                    raise InvalidField(f"{field} is too large", field=field) from None
            else:
                raise InvalidField(
                    f"{field} must be 0x-prefixed hex or decimal digits", field=field
                )
        else:
            number = value
        if number < 0:
            raise InvalidField(f"{field} must not be negative", field=field)
        if number >= self.limit:
            raise InvalidField(f"{field} must be below 2**{self.bits}", field=field)
        return number

    def encode(self, value: int) -> RLPItem:
        return int_to_bytes(value)

    def decode(self, item: RLPItem, field: str) -> int:
        return decode_int(item, field, self.bits)

    def to_json(self, value: int) -> str:
        return hex(value)


class Destination(FieldKind[bytes | None]):
    """The recipient: a 20-byte address, or ``None`` (empty in RLP) for contract creation."""

    def parse(self, value: object, field: str) -> bytes | None:
        return parse_address(value, field)

    def encode(self, value: bytes | None) -> RLPItem:
        return value or b""

    def decode(self, item: RLPItem, field: str) -> bytes | None:
        data = decode_bytes(item, field)
        if not data:
            return None
        if len(data) != 20:
            raise InvalidTransaction(f"{field} must be 20 bytes or empty", field=field)
        return data

    def to_json(self, value: bytes | None) -> str | None:
        return None if value is None else to_checksum_address(value)


class Data(FieldKind[bytes]):
    """Call data or init code: ``0x``-prefixed hex ("" is accepted as empty)."""

    def parse(self, value: object, field: str) -> bytes:
        return b"" if value == "" else _hex_bytes(value, field)

    def encode(self, value: bytes) -> RLPItem:
        return value

    def decode(self, item: RLPItem, field: str) -> bytes:
        return decode_bytes(item, field)

    def to_json(self, value: bytes) -> str:
        return "0x" + value.hex()


class AccessListKind(FieldKind[AccessList]):
    """EIP-2930 access list: ``[{"address": ..., "storageKeys": ["0x" + 64 hex, ...]}]``."""

    def parse(self, value: object, field: str) -> AccessList:
        if not isinstance(value, list | tuple):
            raise InvalidField(f"{field} must be a list", field=field)
        entries = []
        for index, entry in enumerate(value):
            where = f"{field}[{index}]"
            if not isinstance(entry, Mapping) or set(entry) != {"address", "storageKeys"}:
                raise InvalidField(
                    f"{where} must be an object with address and storageKeys only", field=where
                )
            keys = entry["storageKeys"]
            if not isinstance(keys, list | tuple):
                raise InvalidField(
                    f"{where}.storageKeys must be a list", field=f"{where}.storageKeys"
                )
            entries.append(
                (
                    parse_address(entry["address"], f"{where}.address"),
                    tuple(
                        _hex_bytes(key, f"{where}.storageKeys[{position}]", 32)
                        for position, key in enumerate(keys)
                    ),
                )
            )
        return tuple(entries)

    def encode(self, value: AccessList) -> RLPItem:
        return [[address, list(keys)] for address, keys in value]

    def decode(self, item: RLPItem, field: str) -> AccessList:
        entries = []
        for index, entry in enumerate(decode_list(item, field)):
            where = f"{field}[{index}]"
            address, keys = decode_list(entry, where, 2)
            address = decode_bytes(address, f"{where}.address")
            if len(address) != 20:
                raise InvalidTransaction(
                    f"{where}.address must be 20 bytes", field=f"{where}.address"
                )
            storage_keys = []
            for position, key in enumerate(decode_list(keys, f"{where}.storageKeys")):
                path = f"{where}.storageKeys[{position}]"
                storage_key = decode_bytes(key, path)
                if len(storage_key) != 32:
                    raise InvalidTransaction(f"{path} must be 32 bytes", field=path)
                storage_keys.append(storage_key)
            entries.append((address, tuple(storage_keys)))
        return tuple(entries)

    def to_json(self, value: AccessList) -> list[dict[str, Any]]:
        return [
            {
                "address": to_checksum_address(address),
                "storageKeys": ["0x" + key.hex() for key in keys],
            }
            for address, keys in value
        ]


@dataclass(frozen=True, slots=True)
class Field:
    """One transaction field: its wallet-JSON key, attribute name, kind and JSON default."""

    key: str
    attr: str
    kind: FieldKind[Any]
    default: Any = _REQUIRED


_UINT64 = Quantity(64)
_UINT256 = Quantity(256)

MAX_CHAIN_ID: Final = (2**64 - 1) // 2 - 36
"""The largest chain id signd signs a transaction for, of every type: EIP-2294's bound, so
that a legacy transaction's ``v = chainId * 2 + 35 + recovery id`` fits in 64 bits (without a
bound it may not even fit the 256 bits :func:`decode_transaction` reads, and signd would sign
what it cannot decode). No chain uses a larger id; one bound for every type keeps one rule.
Only signing is bounded: :func:`decode_transaction` takes any chain id its field holds, as a
transaction someone else signed is not signd's to refuse for that."""

CHAIN_ID = Field("chainId", "chain_id", _UINT256)
NONCE = Field("nonce", "nonce", _UINT64)
GAS_PRICE = Field("gasPrice", "gas_price", _UINT256)
MAX_PRIORITY_FEE = Field("maxPriorityFeePerGas", "max_priority_fee_per_gas", _UINT256)
MAX_FEE = Field("maxFeePerGas", "max_fee_per_gas", _UINT256)
GAS = Field("gas", "gas", _UINT64)
TO = Field("to", "to", Destination(), None)
VALUE = Field("value", "value", _UINT256, 0)
DATA = Field("data", "data", Data(), b"")
ACCESS_LIST = Field("accessList", "access_list", AccessListKind(), ())


@dataclass(frozen=True, slots=True)
class TransactionSignature:
    """A transaction's signature; ``v`` is 27/28, EIP-155 or the y-parity, by type."""

    r: int
    s: int
    v: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UnsignedTransaction(ABC):
    """Fields common to every type; subclasses declare ``TYPE`` and ``FIELDS`` (RLP order).

    ``from_address`` is the ``from`` the caller named, if any; it is not signed, but
    :meth:`assemble` refuses a signature that does not recover to it.
    """

    TYPE: ClassVar[int]
    NAME: ClassVar[str]
    FIELDS: ClassVar[tuple[Field, ...]]

    chain_id: int | None
    nonce: int
    gas: int
    to: bytes | None
    value: int
    data: bytes
    from_address: str | None = field(default=None, compare=False)

    def _fields_rlp(self) -> list[RLPItem]:
        return [f.kind.encode(getattr(self, f.attr)) for f in self.FIELDS]

    @property
    @abstractmethod
    def fee_per_gas(self) -> int:
        """The most one unit of gas may cost: ``gasPrice``, or ``maxFeePerGas`` (EIP-1559).
        Times ``gas``, the most the transaction may pay in fees."""

    @abstractmethod
    def signing_payload(self) -> bytes:
        """The exact bytes whose keccak256 is signed."""

    @abstractmethod
    def _serialize(self, items: list[RLPItem]) -> bytes:
        """The raw transaction from its RLP items, signature included."""

    @abstractmethod
    def _v(self, recovery_id: int) -> int:
        """The signature's ``v`` for this type."""

    def signing_digest(self) -> bytes:
        """The 32-byte digest a custody backend signs."""
        return keccak256(self.signing_payload())

    def assemble(
        self, signature: RecoverableSignature, *, signer: str | None = None
    ) -> SignedTransaction:
        """Attach a signature over :meth:`signing_digest` and return the signed transaction.

        ``signer`` is the checksummed address of the key that made ``signature``, when the
        caller knows it (its recovery id was checked against that key, or libsecp256k1 made
        it with that key): the sender is then not recovered again."""
        if signature.recovery_id > 1:
            raise InvalidSignature("Ethereum signatures need a recovery id of 0 or 1")
        v = self._v(signature.recovery_id)
        items = self._fields_rlp()
        items += [int_to_bytes(v), int_to_bytes(signature.r), int_to_bytes(signature.s)]
        signed = SignedTransaction(
            self._serialize(items),
            self,
            TransactionSignature(signature.r, signature.s, v),
            signature,
            signer,
        )
        if self.from_address is not None and signed.sender != self.from_address:
            raise InvalidSignature("the signature does not recover to the transaction's from")
        return signed

    def to_json(self) -> dict[str, Any]:
        """The transaction in wallet JSON shape, quantities as hex strings."""
        body: dict[str, Any] = {"type": hex(self.TYPE)}
        if self.chain_id is not None:
            body["chainId"] = hex(self.chain_id)
        for f in self.FIELDS:
            body[f.key] = f.kind.to_json(getattr(self, f.attr))
        if self.from_address is not None:
            body["from"] = self.from_address
        return body


@dataclass(frozen=True, slots=True, kw_only=True)
class LegacyTransaction(UnsignedTransaction):
    """Type 0: EIP-155 replay protection when ``chain_id`` is set, pre-EIP-155 otherwise."""

    TYPE = 0
    NAME = "legacy"
    FIELDS = (NONCE, GAS_PRICE, GAS, TO, VALUE, DATA)

    gas_price: int

    @property
    def fee_per_gas(self) -> int:
        return self.gas_price

    def signing_payload(self) -> bytes:
        items = self._fields_rlp()
        if self.chain_id is not None:
            items += [int_to_bytes(self.chain_id), b"", b""]
        return rlp_encode(items)

    def _serialize(self, items: list[RLPItem]) -> bytes:
        return rlp_encode(items)

    def _v(self, recovery_id: int) -> int:
        if self.chain_id is None:
            return 27 + recovery_id
        return self.chain_id * 2 + 35 + recovery_id


@dataclass(frozen=True, slots=True, kw_only=True)
class TypedTransaction(UnsignedTransaction):
    """An EIP-2718 envelope: ``type ‖ rlp(fields)``, with ``v`` the y-parity."""

    access_list: AccessList = ()

    def __post_init__(self) -> None:
        if self.chain_id is None:
            raise InvalidField(f"a {self.NAME} transaction needs a chainId", field="chainId")

    def signing_payload(self) -> bytes:
        return bytes([self.TYPE]) + rlp_encode(self._fields_rlp())

    def _serialize(self, items: list[RLPItem]) -> bytes:
        return bytes([self.TYPE]) + rlp_encode(items)

    def _v(self, recovery_id: int) -> int:
        return recovery_id


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessListTransaction(TypedTransaction):
    """Type 1 (EIP-2930)."""

    TYPE = 1
    NAME = "EIP-2930"
    FIELDS = (CHAIN_ID, NONCE, GAS_PRICE, GAS, TO, VALUE, DATA, ACCESS_LIST)

    gas_price: int

    @property
    def fee_per_gas(self) -> int:
        return self.gas_price


@dataclass(frozen=True, slots=True, kw_only=True)
class DynamicFeeTransaction(TypedTransaction):
    """Type 2 (EIP-1559)."""

    TYPE = 2
    NAME = "EIP-1559"
    FIELDS = (CHAIN_ID, NONCE, MAX_PRIORITY_FEE, MAX_FEE, GAS, TO, VALUE, DATA, ACCESS_LIST)

    max_priority_fee_per_gas: int
    max_fee_per_gas: int

    @property
    def fee_per_gas(self) -> int:
        return self.max_fee_per_gas

    def __post_init__(self) -> None:
        TypedTransaction.__post_init__(self)
        if self.max_priority_fee_per_gas > self.max_fee_per_gas:
            raise InvalidField(
                "maxPriorityFeePerGas must not exceed maxFeePerGas", field="maxPriorityFeePerGas"
            )


TRANSACTION_TYPES: Final[Mapping[int, type[UnsignedTransaction]]] = {
    cls.TYPE: cls for cls in (LegacyTransaction, AccessListTransaction, DynamicFeeTransaction)
}
_KNOWN_KEYS: Final = frozenset(
    {"type", "chainId", "from", *_ALIASES}
    | {f.key for cls in TRANSACTION_TYPES.values() for f in cls.FIELDS}
)


class SignedTransaction:
    """A signed transaction: raw bytes, hash, sender and the decoded fields.

    The sender is recovered from the signature when first asked for; decoding recovers it at
    once, to refuse signatures that recover to no key.
    """

    __slots__ = ("_sender", "hash", "raw", "recoverable_signature", "signature", "transaction")

    def __init__(
        self,
        raw: bytes,
        transaction: UnsignedTransaction,
        signature: TransactionSignature,
        recoverable: RecoverableSignature,
        sender: str | None = None,
    ) -> None:
        self.raw = raw
        self.hash = keccak256(raw)
        self.transaction = transaction
        self.signature = signature
        self.recoverable_signature = recoverable
        self._sender = sender

    @property
    def sender(self) -> str:
        """The checksummed address that signed the transaction."""
        if self._sender is None:
            digest = self.transaction.signing_digest()
            self._sender = address_from_public_key(
                self.recoverable_signature.recover_public_key(digest)
            )
        return self._sender

    def __repr__(self) -> str:
        return f"SignedTransaction(hash=0x{self.hash.hex()}, transaction={self.transaction!r})"

    def to_dict(self, *, decoded: bool = False) -> dict[str, Any]:
        """``raw_transaction``, ``hash`` and ``from``; with ``decoded``, the fields and v/r/s."""
        body: dict[str, Any] = {
            "raw_transaction": "0x" + self.raw.hex(),
            "hash": "0x" + self.hash.hex(),
            "from": self.sender,
        }
        if decoded:
            fields = self.transaction.to_json()
            fields.pop("from", None)
            body["transaction"] = fields
            body["signature"] = {
                "r": hex(self.signature.r),
                "s": hex(self.signature.s),
                "v": hex(self.signature.v),
            }
        return body


def _canonical_keys(data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Resolve aliases: the values by canonical key, and the key each value was sent as.
    ``data`` and ``input`` may both be given when they are the same bytes, as geth accepts
    them (some wallets send both); any other alias given with its field is refused."""
    values: dict[str, Any] = {}
    sent_as: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise InvalidTransaction("transaction keys must be strings")
        canonical = _ALIASES.get(key, key)
        if canonical in values:
            if canonical == "data" and _same_hex(values[canonical], value):
                continue
            raise InvalidField(f"give only one of {canonical} and {key}", field=key)
        values[canonical] = value
        sent_as[canonical] = key
    return values, sent_as


def _same_hex(first: object, second: object) -> bool:
    """Whether two values are the same ``0x`` hex (letter case aside); a value that is not
    hex is refused where the field is read."""
    return isinstance(first, str) and isinstance(second, str) and first.lower() == second.lower()


def _transaction_type(values: Mapping[str, Any]) -> type[UnsignedTransaction]:
    """The declared type, or the one implied by the fee and access-list fields."""
    declared = values.get("type")
    if declared is None:
        if values.get("maxFeePerGas") is not None or values.get("maxPriorityFeePerGas") is not None:
            return DynamicFeeTransaction
        if values.get("accessList") is not None:
            return AccessListTransaction
        return LegacyTransaction
    type_id = _UINT64.parse(declared, "type")
    if type_id not in TRANSACTION_TYPES:
        raise InvalidField(f"unsupported transaction type {type_id}", field="type")
    return TRANSACTION_TYPES[type_id]


def parse_transaction(data: Mapping[str, Any]) -> UnsignedTransaction:
    """Validate a transaction as wallets send it (JSON-RPC shape) and build it.

    Absent or null ``to`` means contract creation (``""`` is refused as ambiguous);
    ``value``, ``data`` and ``accessList`` default to empty; everything else the type uses is
    required, and nothing else is accepted (``gasLimit`` and ``input`` are aliases of ``gas``
    and ``data``; ``from``, if given, is checked against the signature by ``assemble``). A
    legacy transaction without ``chainId`` is pre-EIP-155; ``chainId`` is 1 to
    :data:`MAX_CHAIN_ID`.
    """
    if not isinstance(data, Mapping):
        raise InvalidTransaction("a transaction must be a JSON object")
    values, sent_as = _canonical_keys(data)
    cls = _transaction_type(values)
    allowed = {"type", "chainId", "from"} | {f.key for f in cls.FIELDS}
    for key in values.keys() - allowed:
        name = sent_as[key]
        if key in _KNOWN_KEYS:
            raise InvalidField(f"{name} is not allowed in a {cls.NAME} transaction", field=name)
        raise InvalidField(f"unknown transaction field {name}", field=name)

    arguments: dict[str, Any] = {}
    for f in cls.FIELDS:
        value = values.get(f.key)
        name = sent_as.get(f.key, f.key)
        if value is not None:
            arguments[f.attr] = f.kind.parse(value, name)
        elif f.default is _REQUIRED:
            raise InvalidField(f"{name} is required", field=name)
        else:
            arguments[f.attr] = f.default
    if cls is LegacyTransaction:
        chain_id = values.get("chainId")
        arguments["chain_id"] = (
            None if chain_id is None else CHAIN_ID.kind.parse(chain_id, "chainId")
        )
    if arguments["chain_id"] == 0:
        raise InvalidField("chainId must be at least 1", field="chainId")
    if arguments["chain_id"] is not None and arguments["chain_id"] > MAX_CHAIN_ID:
        raise InvalidField(f"chainId must be at most {MAX_CHAIN_ID} (EIP-2294)", field="chainId")
    sender = values.get("from")
    if sender is not None:
        arguments["from_address"] = to_checksum_address(parse_address(sender, "from"))
    return cls(**arguments)


def decode_transaction(raw: bytes, chain_id: int | None = None) -> SignedTransaction:
    """Decode a signed raw transaction of a supported type and recover its sender.

    Refuses trailing bytes, non-canonical RLP and integers, wrong field counts, bad ``v``,
    out-of-range or high-S signatures, and anything whose sender cannot be recovered. With
    ``chain_id``, also refuses a transaction for another chain (a pre-EIP-155 transaction
    names no chain and is not refused for that).
    """
    if isinstance(raw, bytearray | memoryview):
        raw = bytes(raw)
    if not isinstance(raw, bytes) or not raw:
        raise InvalidTransaction("a raw transaction is a non-empty byte string")
    if raw[0] >= 0xC0:
        cls: type[UnsignedTransaction] = LegacyTransaction
        payload = raw
    elif raw[0] in TRANSACTION_TYPES and raw[0] != LegacyTransaction.TYPE:
        cls = TRANSACTION_TYPES[raw[0]]
        payload = raw[1:]
    else:
        raise InvalidTransaction(f"unsupported transaction type {raw[0]}", field="type")
    items = decode_list(rlp_decode(payload), "transaction", len(cls.FIELDS) + 3)
    arguments = {
        f.attr: f.kind.decode(item, f.key) for f, item in zip(cls.FIELDS, items, strict=False)
    }
    v = decode_int(items[-3], "v")
    r = decode_int(items[-2], "r")
    s = decode_int(items[-1], "s")
    if cls is LegacyTransaction:
        if v in (27, 28):
            arguments["chain_id"], recovery_id = None, v - 27
        elif v >= 37:
            arguments["chain_id"], recovery_id = divmod(v - 35, 2)
        else:
            raise InvalidTransaction(f"legacy v must be 27, 28 or at least 37, not {v}", field="v")
    elif v in (0, 1):
        recovery_id = v
    else:
        raise InvalidTransaction(f"typed transaction v must be 0 or 1, not {v}", field="v")
    if chain_id is not None and arguments["chain_id"] not in (None, chain_id):
        raise InvalidTransaction(
            f"transaction is for chain {arguments['chain_id']}, not {chain_id}", field="chainId"
        )
    try:
        transaction = cls(**arguments)
        recoverable = RecoverableSignature(r, s, recovery_id)
        public_key = recoverable.recover_public_key(transaction.signing_digest())
    except (InvalidField, InvalidSignature) as error:
        raise InvalidTransaction(error.message, field=error.field) from None
    return SignedTransaction(
        raw,
        transaction,
        TransactionSignature(r, s, v),
        recoverable,
        sender=address_from_public_key(public_key),
    )
