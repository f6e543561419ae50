"""EIP-712 typed structured data, with ``eth_signTypedData_v4`` semantics.

Supports nested structs, arrays (dynamic, fixed-size, multi-dimensional, of structs),
``string``/``bytes`` hashing, ``bytes1``..``bytes32``, ``int8``..``int256``/``uint8``..``uint256``
with range checks, ``address`` and ``bool``. Documents are validated strictly: undefined or
malformed types, missing or extra message fields and out-of-range values are refused with
:class:`signd.errors.InvalidTypedData` naming the offending path.

The work is linear in the size of the document: each type string is parsed once, and a
value's place (``message.to.wallet``) is spelled out only when there is an error to report.
Only the type encodings can grow faster, since the ``encodeType`` of a struct repeats every
struct it uses (n types that each use the next make n²/2 definitions to hash):
:data:`MAX_TYPE_ENCODING` bounds them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
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

MAX_TYPE_ENCODING: Final = 1 << 20
"""The most characters of ``encodeType`` one document may hash, over all its struct types:
twice the largest request body, and hundreds of times what real documents need."""

_IDENTIFIER = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*")
_TYPE_REFERENCE = re.compile(r"([^\[\]]*)(?:\[(?:[1-9][0-9]*)?\])*")
"""A type as a field declares it: a base type, then any array dimensions (``uint8[2][]``)."""
_INTEGER = re.compile(r"(u?)int([1-9][0-9]{0,2})")  # more digits are no type (and int() fails)
_FIXED_BYTES = re.compile(r"bytes([1-9][0-9]?)")
_ATOMIC = frozenset({"address", "bool", "string", "bytes"})
_DOCUMENT_KEYS = frozenset({"types", "primaryType", "domain", "message"})
_DOMAIN_ONLY_KEYS = _DOCUMENT_KEYS - {"message"}
_DOCUMENT_SHAPE = "typed data needs exactly types, primaryType, domain and message"
_STANDARD_DOMAIN_FIELDS = frozenset(name for name, _ in DOMAIN_FIELDS)

StructFields = tuple[tuple[str, str], ...]
ArrayType = tuple[str, str | None]
"""An array type's element type and its length as declared (``None``: dynamic)."""


class _Path:
    """Where a value is in the document, e.g. ``message.to.wallet`` or ``message.cc[1]``.

    A link to its parent, spelled out only for an error: building the text for every value
    would cost the depth of the nesting times the length of the names, per value."""

    __slots__ = ("parent", "step")

    def __init__(self, parent: _Path | None, step: str | int) -> None:
        self.parent = parent
        self.step = step

    def __str__(self) -> str:
        steps: list[str] = []
        node: _Path | None = self
        while node is not None:
            step = node.step
            if isinstance(step, int):
                steps.append(f"[{step}]")
            else:
                steps.append(step if node.parent is None else f".{step}")
            node = node.parent
        return "".join(reversed(steps))


def _is_atomic(type_name: str) -> bool:
    if type_name in _ATOMIC:
        return True
    integer = _INTEGER.fullmatch(type_name)
    if integer:
        bits = int(integer.group(2))
        return bits <= 256 and bits % 8 == 0
    fixed = _FIXED_BYTES.fullmatch(type_name)
    return fixed is not None and int(fixed.group(1)) <= 32


def _invalid(path: _Path, problem: str) -> InvalidTypedData:
    """The error for the value at ``path``, e.g. ``message.to.wallet must be ...``."""
    where = str(path)
    return InvalidTypedData(f"{where} {problem}", field=where)


def _invalid_entry(struct: str, position: int, problem: str) -> InvalidTypedData:
    """The error for a field of a struct type, e.g. ``types.Mail[2] repeats field ...``."""
    where = f"types.{struct}[{position}]"
    return InvalidTypedData(f"{where} {problem}", field=where)


def _hex(value: object, path: _Path) -> bytes:
    if not isinstance(value, str) or value[:2] != "0x" or len(value) % 2 or not is_hex(value[2:]):
        raise _invalid(path, "must be 0x-prefixed hex with an even length")
    return bytes.fromhex(value[2:])


def _integer(value: object, signed: bool, path: _Path) -> int:
    """An int, a decimal string (``-`` allowed for signed types) or non-negative ``0x`` hex."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _invalid(path, "must be an integer or a numeric string")
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
            raise _invalid(path, "is out of range") from None
    else:
        raise _invalid(path, f"is not a number: {value!r}")
    return -number if negative else number


class _Types:
    """A validated ``types`` table and the EIP-712 encoding over it."""

    def __init__(self, types: object) -> None:
        if not isinstance(types, Mapping):
            raise InvalidTypedData("types must be an object", field="types")
        self.structs: dict[str, StructFields] = {}
        self.field_names: dict[str, frozenset[str]] = {}
        for name, fields in types.items():
            if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name) or _is_atomic(name):
                raise InvalidTypedData(f"invalid struct type name {name!r}", field="types")
            self.structs[name] = self._fields(name, fields)
            self.field_names[name] = frozenset(field for field, _ in self.structs[name])
        self._hashes: dict[str, bytes] = {}
        self._arrays: dict[str, ArrayType | None] = {}
        self._definitions: dict[str, str] = {}  # its part of encodeType: Mail(Person from,...)
        self._dependencies: dict[str, tuple[str, ...]] = {}  # the struct types its fields use
        self._type_encoding_size = 0  # of every encodeType made so far
        for name, fields in self.structs.items():
            used: dict[str, None] = {}
            for position, (_, type_name) in enumerate(fields):
                base = self._base(type_name)
                if base is None:
                    path = f"types.{name}[{position}].type"
                    raise InvalidTypedData(f"undefined type {type_name!r}", field=path)
                if base in self.structs:
                    used[base] = None
            self._dependencies[name] = tuple(used)
            self._definitions[name] = f"{name}({','.join(f'{t} {n}' for n, t in fields)})"

    @staticmethod
    def _fields(struct: str, fields: object) -> StructFields:
        if not isinstance(fields, list | tuple):
            raise InvalidTypedData(f"types.{struct} must be a list", field=f"types.{struct}")
        result: list[tuple[str, str]] = []
        seen: set[str] = set()
        for position, entry in enumerate(fields):
            if not isinstance(entry, Mapping) or set(entry) != {"name", "type"}:
                raise _invalid_entry(struct, position, "must be an object with name and type")
            name, type_name = entry["name"], entry["type"]
            if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
                raise _invalid_entry(struct, position, f"has an invalid field name {name!r}")
            if not isinstance(type_name, str):
                raise _invalid_entry(struct, position, "has a type that is not a string")
            if name in seen:
                raise _invalid_entry(struct, position, f"repeats field {name!r}")
            seen.add(name)
            result.append((name, type_name))
        return tuple(result)

    def _base(self, type_name: str) -> str | None:
        """The atomic or struct type of ``type_name`` without its array dimensions, or
        ``None`` if it names no defined type."""
        reference = _TYPE_REFERENCE.fullmatch(type_name)
        if reference is None:
            return None
        base = reference.group(1)
        return base if _is_atomic(base) or base in self.structs else None

    def array(self, type_name: str) -> ArrayType | None:
        """The element type and length of an array type; ``None`` for any other type.

        Remembered, so that every item of an array is encoded with the same element type
        string, whose hash Python keeps: a long type is not read again for each item."""
        try:
            return self._arrays[type_name]
        except KeyError:
            pass
        array = None
        if type_name.endswith("]"):
            opening = type_name.rindex("[")
            array = (type_name[:opening], type_name[opening + 1 : -1] or None)
        self._arrays[type_name] = array
        return array

    def struct(self, name: str, path: str = "primaryType") -> StructFields:
        fields = self.structs.get(name)
        if fields is None:
            raise InvalidTypedData(f"undefined struct type {name!r}", field=path)
        return fields

    def encode_type(self, primary: str) -> str:
        """``Primary(fields)`` followed by every referenced struct, sorted by name.

        Counted against :data:`MAX_TYPE_ENCODING` as each struct is found, so that the
        search stops as soon as the document has made too much to hash."""
        self.struct(primary)
        found = {primary}
        pending = [primary]
        while pending:
            name = pending.pop()
            self._type_encoding_size += len(self._definitions[name])
            if self._type_encoding_size > MAX_TYPE_ENCODING:
                raise InvalidTypedData(
                    f"the struct types encode to more than {MAX_TYPE_ENCODING} characters"
                    " (encodeType, over every struct type hashed)",
                    field="types",
                )
            for dependency in self._dependencies[name]:
                if dependency not in found:
                    found.add(dependency)
                    pending.append(dependency)
        found.remove(primary)
        return self._definitions[primary] + "".join(self._definitions[n] for n in sorted(found))

    def type_hash(self, primary: str) -> bytes:
        cached = self._hashes.get(primary)
        if cached is None:
            cached = self._hashes[primary] = keccak256(self.encode_type(primary).encode())
        return cached

    def encode_data(self, primary: str, value: object, path: _Path, depth: int = 0) -> bytes:
        """``typeHash ‖ enc(field 1) ‖ ...``: the message fields must match the type exactly."""
        fields = self.struct(primary)
        if not isinstance(value, Mapping):
            raise _invalid(path, f"must be an object of type {primary}")
        names = self.field_names[primary]
        for key in value:
            if key not in names:
                raise _invalid(path, f"has no field {key!r} in {primary}")
        parts = [self.type_hash(primary)]
        for name, type_name in fields:
            if name not in value:
                raise _invalid(_Path(path, name), "is missing")
            parts.append(self.encode_value(type_name, value[name], _Path(path, name), depth + 1))
        return b"".join(parts)

    def encode_value(self, type_name: str, value: object, path: _Path, depth: int) -> bytes:
        """The 32-byte encoding of one value."""
        if depth > MAX_DEPTH:
            raise _invalid(path, "is nested too deeply")
        if type_name in self.structs:
            return keccak256(self.encode_data(type_name, value, path, depth))
        array = self.array(type_name)
        if array is not None:
            element, length = array
            if not isinstance(value, list | tuple):
                raise _invalid(path, f"must be an array ({type_name})")
            if length is not None and str(len(value)) != length:
                raise _invalid(path, f"must have {length} items")
            return keccak256(
                b"".join(
                    self.encode_value(element, item, _Path(path, index), depth + 1)
                    for index, item in enumerate(value)
                )
            )
        return _encode_atomic(type_name, value, path)


def _encode_atomic(type_name: str, value: object, path: _Path) -> bytes:
    if type_name == "string":
        if not isinstance(value, str):
            raise _invalid(path, "must be a string")
        try:
            return keccak256(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise _invalid(path, "is not valid Unicode") from None
    if type_name == "bytes":
        return keccak256(_hex(value, path))
    if type_name == "bool":
        if not isinstance(value, bool):
            raise _invalid(path, "must be true or false")
        return int(value).to_bytes(32, "big")
    if type_name == "address":
        try:
            return parse_address(value, "the address").rjust(32, b"\x00")
        except InvalidField as error:
            where = str(path)
            raise InvalidTypedData(f"{where}: {error.message}", field=where) from None
    fixed = _FIXED_BYTES.fullmatch(type_name)
    if fixed:
        data = _hex(value, path)
        if len(data) != int(fixed.group(1)):
            raise _invalid(path, f"must be {fixed.group(1)} bytes")
        return data.ljust(32, b"\x00")
    integer = _INTEGER.fullmatch(type_name)
    if integer is None:
        raise _invalid(path, f"has an undefined type {type_name!r}")
    signed, bits = integer.group(1) == "", int(integer.group(2))
    number = _integer(value, signed, path)
    low, high = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    if not low <= number < high:
        raise _invalid(path, f"is out of range for {type_name}")
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
    return _Types(types).encode_data(primary_type, value, _Path(None, "message"))


def hash_struct(primary_type: str, types: Mapping[str, Any], value: Mapping[str, Any]) -> bytes:
    """EIP-712 ``hashStruct``: keccak256 of :func:`encode_data`."""
    return keccak256(encode_data(primary_type, types, value))


def domain_separator(domain: Mapping[str, Any], types: Mapping[str, Any] | None = None) -> bytes:
    """``hashStruct(EIP712Domain, domain)``; the domain type comes from ``types`` or the keys."""
    full = _Types(_domain_types(domain, types or {}))
    return keccak256(full.encode_data(DOMAIN_TYPE, _present(full, domain), _Path(None, "domain")))


@dataclass(frozen=True, slots=True)
class TypedData:
    """A validated EIP-712 document: the digest ``eth_signTypedData_v4`` signs, and the domain
    as it is signed."""

    digest: bytes
    domain: Mapping[str, Any]
    """The domain's fields that are signed (a ``null`` standard field is absent)."""
    domain_types: Mapping[str, str]
    """The type of each field of ``EIP712Domain``, declared or inferred."""

    def chain_id(self) -> int | None:
        """The domain's ``chainId`` as the digest encodes it; ``None`` if it has none.

        Only an unsigned integer type names a chain. Declared ``string``, ``bytes32``,
        ``address`` or ``int256``, a ``chainId`` of ``"1"`` or ``0x…01`` is signed as that text
        or those bytes, which is not the domain of chain 1 that a verifier computes: it is
        refused rather than read as a number.
        """
        value = self.domain.get("chainId")
        if value is None:
            return None
        declared = self.domain_types["chainId"]
        if not (_is_atomic(declared) and declared.startswith("uint")):
            raise InvalidField(
                f"domain.chainId is declared {declared!r}: only an unsigned integer type"
                " (uint256) names a chain",
                field="domain.chainId",
            )
        path = _Path(_Path(None, "domain"), "chainId")
        return int.from_bytes(_encode_atomic(declared, value, path), "big")

    def judged_domain(self) -> dict[str, Any]:
        """The domain as a policy may judge it: the standard fields only in the types
        EIP-712 gives them (``name`` and ``version`` string, ``chainId`` an unsigned integer,
        read as the integer signed, ``verifyingContract`` address), so that what a rule
        matches is what a verifier of that domain computes. A standard field declared in
        another type is refused: ``verifyingContract`` declared ``string`` is signed as the
        hash of its text, not as the contract's address."""
        judged = dict(self.domain)
        for name, wanted in _JUDGED_DOMAIN_TYPES.items():
            declared = self.domain_types.get(name)
            if name in judged and declared != wanted:
                raise InvalidField(
                    f"domain.{name} is declared {declared!r}: a policy reads it only as {wanted}",
                    field=f"domain.{name}",
                )
        chain_id = self.chain_id()
        if chain_id is not None:
            judged["chainId"] = chain_id
        return judged


_JUDGED_DOMAIN_TYPES: Final[Mapping[str, str]] = {
    "name": "string",
    "version": "string",
    "verifyingContract": "address",
}
"""The standard domain fields a policy reads, besides ``chainId`` (any ``uintN``)."""


def parse_typed_data(document: Mapping[str, Any]) -> TypedData:
    """Validate an ``eth_signTypedData_v4`` document and work out what it signs:
    keccak256(0x1901 ‖ domainSeparator ‖ hashStruct(message)).

    ``primaryType: EIP712Domain`` signs keccak256(0x1901 ‖ domainSeparator) alone, as MetaMask
    does. Its ``message`` must then be absent or ``{}``: nothing in it would be signed, yet a
    reader of the request (an auditor, a UI) would take it for what was. eth-account refuses
    such documents altogether.
    """
    if not isinstance(document, Mapping) or set(document) not in (
        _DOCUMENT_KEYS,
        _DOMAIN_ONLY_KEYS,
    ):
        raise InvalidTypedData(_DOCUMENT_SHAPE)
    primary = document["primaryType"]
    if not isinstance(primary, str):
        raise InvalidTypedData("primaryType must be a string", field="primaryType")
    if primary == DOMAIN_TYPE:
        message = document.get("message", {})
        if not isinstance(message, Mapping) or message:
            raise InvalidTypedData(
                f"primaryType {DOMAIN_TYPE} signs the domain alone: message must be {{}} or absent",
                field="message",
            )
    elif "message" not in document:
        raise InvalidTypedData(_DOCUMENT_SHAPE)
    domain = document["domain"]
    all_types = _Types(_domain_types(domain, document["types"]))
    present = _present(all_types, domain)
    separator = keccak256(all_types.encode_data(DOMAIN_TYPE, present, _Path(None, "domain")))
    if primary == DOMAIN_TYPE:
        digest = keccak256(b"\x19\x01" + separator)
    else:
        message = all_types.encode_data(primary, document["message"], _Path(None, "message"))
        digest = keccak256(b"\x19\x01" + separator + keccak256(message))
    return TypedData(digest, present, dict(all_types.structs[DOMAIN_TYPE]))


def typed_data_digest(document: Mapping[str, Any]) -> bytes:
    """What ``eth_signTypedData_v4`` signs (see :func:`parse_typed_data`)."""
    return parse_typed_data(document).digest
