"""EIP-712 typed structured data, with ``eth_signTypedData_v4`` semantics.

Supports nested structs, arrays (dynamic, fixed-size, multi-dimensional, of structs),
``string``/``bytes`` hashing, ``bytes1``..``bytes32``, ``int8``..``int256``/``uint8``..``uint256``
with range checks, ``address`` and ``bool``. Documents are validated strictly: undefined or
malformed types, missing or extra message fields and out-of-range values are refused with
:class:`signd.errors.InvalidTypedData` naming the offending path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from signd.chains.ethereum.address import parse_address
from signd.chains.ethereum.encoding import is_hex
from signd.crypto.hashing import keccak256
from signd.errors import InvalidField, InvalidTypedData

DOMAIN_TYPE: Final = "EIP712Domain"
DOMAIN_FIELDS: Final = (
    ("name", "string"),
    ("version", "string"),
    ("chainId", "uint256"),
    ("verifyingContract", "address"),
    ("salt", "bytes32"),
)
"""The standard domain fields, in the order used when the domain type is inferred."""

MAX_DEPTH: Final = 64
"""Deepest nesting of structs and arrays in a value."""

_IDENTIFIER = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*")
_ARRAY = re.compile(r"(.+)\[([1-9][0-9]*)?\]")
_INTEGER = re.compile(r"(u?)int([1-9][0-9]*)")
_FIXED_BYTES = re.compile(r"bytes([1-9][0-9]?)")
_ATOMIC = frozenset({"address", "bool", "string", "bytes"})
_DOCUMENT_KEYS = frozenset({"types", "primaryType", "domain", "message"})
_STANDARD_DOMAIN_FIELDS = frozenset(name for name, _ in DOMAIN_FIELDS)

StructFields = tuple[tuple[str, str], ...]


def _is_atomic(type_name: str) -> bool:
    if type_name in _ATOMIC:
        return True
    integer = _INTEGER.fullmatch(type_name)
    if integer:
        bits = int(integer.group(2))
        return bits <= 256 and bits % 8 == 0
    fixed = _FIXED_BYTES.fullmatch(type_name)
    return fixed is not None and int(fixed.group(1)) <= 32


def _hex(value: object, path: str) -> bytes:
    if not isinstance(value, str) or value[:2] != "0x" or len(value) % 2 or not is_hex(value[2:]):
        raise InvalidTypedData(f"{path} must be 0x-prefixed hex with an even length", field=path)
    return bytes.fromhex(value[2:])


def _integer(value: object, signed: bool, path: str) -> int:
    """An int, a decimal string (``-`` allowed for signed types) or non-negative ``0x`` hex."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidTypedData(f"{path} must be an integer or a numeric string", field=path)
    if isinstance(value, int):
        return value
    negative = signed and value[:1] == "-"
    digits = value[1:] if negative else value
    if not negative and len(digits) > 2 and digits[:2] == "0x" and is_hex(digits[2:]):
        number = int(digits, 16)
    elif digits.isascii() and digits.isdigit():
        try:
            number = int(digits)
        except ValueError:
            raise InvalidTypedData(f"{path} is out of range", field=path) from None
    else:
        raise InvalidTypedData(f"{path} is not a number: {value!r}", field=path)
    return -number if negative else number


class _Types:
    """A validated ``types`` table and the EIP-712 encoding over it."""

    def __init__(self, types: object) -> None:
        if not isinstance(types, Mapping):
            raise InvalidTypedData("types must be an object", field="types")
        self.structs: dict[str, StructFields] = {}
        for name, fields in types.items():
            if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name) or _is_atomic(name):
                raise InvalidTypedData(f"invalid struct type name {name!r}", field="types")
            self.structs[name] = self._fields(name, fields)
        self._hashes: dict[str, bytes] = {}
        for name, fields in self.structs.items():
            for position, (_, type_name) in enumerate(fields):
                self._check_type(type_name, f"types.{name}[{position}].type")

    @staticmethod
    def _fields(struct: str, fields: object) -> StructFields:
        if not isinstance(fields, list | tuple):
            raise InvalidTypedData(f"types.{struct} must be a list", field=f"types.{struct}")
        result: list[tuple[str, str]] = []
        for position, entry in enumerate(fields):
            path = f"types.{struct}[{position}]"
            if not isinstance(entry, Mapping) or set(entry) != {"name", "type"}:
                raise InvalidTypedData(f"{path} must be an object with name and type", field=path)
            name, type_name = entry["name"], entry["type"]
            if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
                raise InvalidTypedData(f"{path} has an invalid field name {name!r}", field=path)
            if not isinstance(type_name, str):
                raise InvalidTypedData(f"{path}.type must be a string", field=path)
            if any(name == seen for seen, _ in result):
                raise InvalidTypedData(f"{path} repeats field {name!r}", field=path)
            result.append((name, type_name))
        return tuple(result)

    def _check_type(self, type_name: str, path: str) -> None:
        array = _ARRAY.fullmatch(type_name)
        while array:
            type_name = array.group(1)
            array = _ARRAY.fullmatch(type_name)
        if not _is_atomic(type_name) and type_name not in self.structs:
            raise InvalidTypedData(f"undefined type {type_name!r}", field=path)

    def struct(self, name: str, path: str = "primaryType") -> StructFields:
        fields = self.structs.get(name)
        if fields is None:
            raise InvalidTypedData(f"undefined struct type {name!r}", field=path)
        return fields

    def encode_type(self, primary: str) -> str:
        """``Primary(fields)`` followed by every referenced struct, sorted by name."""
        self.struct(primary)
        found: set[str] = set()
        pending = [primary]
        while pending:
            name = pending.pop()
            if name in found:
                continue
            found.add(name)
            for _, type_name in self.structs[name]:
                base = type_name.partition("[")[0]
                if base in self.structs:
                    pending.append(base)
        ordered = [primary, *sorted(found - {primary})]
        return "".join(
            f"{name}({','.join(f'{t} {n}' for n, t in self.structs[name])})" for name in ordered
        )

    def type_hash(self, primary: str) -> bytes:
        cached = self._hashes.get(primary)
        if cached is None:
            cached = self._hashes[primary] = keccak256(self.encode_type(primary).encode())
        return cached

    def encode_data(self, primary: str, value: object, path: str, depth: int = 0) -> bytes:
        """``typeHash ‖ enc(field 1) ‖ ...``: the message fields must match the type exactly."""
        fields = self.struct(primary)
        if not isinstance(value, Mapping):
            raise InvalidTypedData(f"{path} must be an object of type {primary}", field=path)
        names = {name for name, _ in fields}
        for key in value:
            if key not in names:
                raise InvalidTypedData(f"{path} has no field {key!r} in {primary}", field=path)
        parts = [self.type_hash(primary)]
        for name, type_name in fields:
            if name not in value:
                raise InvalidTypedData(f"{path}.{name} is missing", field=f"{path}.{name}")
            parts.append(self.encode_value(type_name, value[name], f"{path}.{name}", depth + 1))
        return b"".join(parts)

    def encode_value(self, type_name: str, value: object, path: str, depth: int) -> bytes:
        """The 32-byte encoding of one value."""
        if depth > MAX_DEPTH:
            raise InvalidTypedData(f"{path} is nested too deeply", field=path)
        if type_name in self.structs:
            return keccak256(self.encode_data(type_name, value, path, depth))
        array = _ARRAY.fullmatch(type_name)
        if array:
            if not isinstance(value, list | tuple):
                raise InvalidTypedData(f"{path} must be an array ({type_name})", field=path)
            if array.group(2) is not None and len(value) != int(array.group(2)):
                raise InvalidTypedData(f"{path} must have {array.group(2)} items", field=path)
            element = array.group(1)
            return keccak256(
                b"".join(
                    self.encode_value(element, item, f"{path}[{index}]", depth + 1)
                    for index, item in enumerate(value)
                )
            )
        return _encode_atomic(type_name, value, path)


def _encode_atomic(type_name: str, value: object, path: str) -> bytes:
    if type_name == "string":
        if not isinstance(value, str):
            raise InvalidTypedData(f"{path} must be a string", field=path)
        try:
            return keccak256(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidTypedData(f"{path} is not valid Unicode", field=path) from None
    if type_name == "bytes":
        return keccak256(_hex(value, path))
    if type_name == "bool":
        if not isinstance(value, bool):
            raise InvalidTypedData(f"{path} must be true or false", field=path)
        return int(value).to_bytes(32, "big")
    if type_name == "address":
        try:
            return parse_address(value, path).rjust(32, b"\x00")
        except InvalidField as error:
            raise InvalidTypedData(error.message, field=path) from None
    fixed = _FIXED_BYTES.fullmatch(type_name)
    if fixed:
        data = _hex(value, path)
        if len(data) != int(fixed.group(1)):
            raise InvalidTypedData(f"{path} must be {fixed.group(1)} bytes", field=path)
        return data.ljust(32, b"\x00")
    integer = _INTEGER.fullmatch(type_name)
    if integer is None:
        raise InvalidTypedData(f"undefined type {type_name!r}", field=path)
    signed, bits = integer.group(1) == "", int(integer.group(2))
    number = _integer(value, signed, path)
    low, high = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    if not low <= number < high:
        raise InvalidTypedData(f"{path} is out of range for {type_name}", field=path)
    return (number % (1 << 256)).to_bytes(32, "big")


def _domain_types(domain: object, types: object) -> dict[str, Any]:
    """``types`` with an ``EIP712Domain`` entry, inferred from the domain's keys if absent."""
    if not isinstance(domain, Mapping):
        raise InvalidTypedData("domain must be an object", field="domain")
    if not isinstance(types, Mapping):
        raise InvalidTypedData("types must be an object", field="types")
    if DOMAIN_TYPE in types:
        return dict(types)
    known = dict(DOMAIN_FIELDS)
    for key in domain:
        if key not in known:
            raise InvalidTypedData(f"unknown domain field {key!r}", field=f"domain.{key}")
    inferred = [{"name": n, "type": t} for n, t in DOMAIN_FIELDS if domain.get(n) is not None]
    return {**types, DOMAIN_TYPE: inferred}


def _present(types: _Types, domain: Mapping[str, Any]) -> dict[str, Any]:
    """The domain's fields that are not null. A null standard field (``salt: null``) is
    absent; any other key the domain type lacks is refused, null or not: it would not be
    signed, and a reader of the request could take it for part of what is."""
    names = {name for name, _ in types.struct(DOMAIN_TYPE, "types")}
    present: dict[str, Any] = {}
    for key, value in domain.items():
        if key in names:
            if value is not None:
                present[key] = value
        elif value is not None or key not in _STANDARD_DOMAIN_FIELDS:
            raise InvalidTypedData(f"domain has no field {key!r} in {DOMAIN_TYPE}", field="domain")
    return present


def encode_type(primary_type: str, types: Mapping[str, Any]) -> str:
    """EIP-712 ``encodeType``, e.g. ``Mail(Person from,...)Person(string name,...)``."""
    return _Types(types).encode_type(primary_type)


def type_hash(primary_type: str, types: Mapping[str, Any]) -> bytes:
    """keccak256 of :func:`encode_type`."""
    return _Types(types).type_hash(primary_type)


def encode_data(primary_type: str, types: Mapping[str, Any], value: Mapping[str, Any]) -> bytes:
    """EIP-712 ``encodeData``: the type hash followed by each field's 32-byte encoding."""
    return _Types(types).encode_data(primary_type, value, "message")


def hash_struct(primary_type: str, types: Mapping[str, Any], value: Mapping[str, Any]) -> bytes:
    """EIP-712 ``hashStruct``: keccak256 of :func:`encode_data`."""
    return keccak256(encode_data(primary_type, types, value))


def domain_separator(domain: Mapping[str, Any], types: Mapping[str, Any] | None = None) -> bytes:
    """``hashStruct(EIP712Domain, domain)``; the domain type comes from ``types`` or the keys."""
    full = _Types(_domain_types(domain, types or {}))
    return keccak256(full.encode_data(DOMAIN_TYPE, _present(full, domain), "domain"))


def typed_data_digest(document: Mapping[str, Any]) -> bytes:
    """What ``eth_signTypedData_v4`` signs: keccak256(0x1901 ‖ domainSeparator ‖ hashStruct)."""
    if not isinstance(document, Mapping) or set(document) != _DOCUMENT_KEYS:
        raise InvalidTypedData("typed data needs exactly types, primaryType, domain and message")
    primary = document["primaryType"]
    if not isinstance(primary, str):
        raise InvalidTypedData("primaryType must be a string", field="primaryType")
    domain = document["domain"]
    all_types = _Types(_domain_types(domain, document["types"]))
    separator = keccak256(all_types.encode_data(DOMAIN_TYPE, _present(all_types, domain), "domain"))
    if primary == DOMAIN_TYPE:
        return keccak256(b"\x19\x01" + separator)
    message = keccak256(all_types.encode_data(primary, document["message"], "message"))
    return keccak256(b"\x19\x01" + separator + message)
