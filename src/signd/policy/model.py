"""The policy file: rules that each grant a set of clients a set of operations on some keys,
under constraints. Anything no rule grants is refused.

Parsing is strict: an unknown key, a bad address (EIP-55 mixed case is checked), a negative
limit or an inconsistent rule is a :class:`~signd.errors.ConfigurationError` naming the rule,
so a mistake is caught when the file is loaded, not when a request is refused (or allowed).
:attr:`Policy.sha256` is the SHA-256 of the file's bytes, for logs and attestation.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from signd.auth.clients import check_client_id, labels_match
from signd.auth.reload import Reloadable
from signd.errors import ConfigurationError, InvalidField
from signd.policy.addresses import parse_address, parse_selector, to_checksum_address
from signd.policy.intent import Operation, SigningIntent

ANY: Final = "*"
DEFAULT_WINDOW_SECONDS: Final = 86_400
MAX_RULE_NAME_LENGTH: Final = 64
MAX_VALUE: Final = 2**256 - 1
_FILE_KEYS: Final = frozenset({"version", "rules"})
_RULE_KEYS: Final = frozenset(
    {
        "name",
        "clients",
        "key_labels",
        "operations",
        "chains",
        "chain_ids",
        "to_allowlist",
        "max_value_per_tx",
        "max_value_per_window",
        "window_seconds",
        "count_fees_in_window",
        "max_fee_per_tx",
        "max_fee_per_gas",
        "contract_selectors",
        "allow_contract_creation",
        "eip712_domains",
        "blind_signing",
    }
)
_DOMAIN_KEYS: Final = frozenset({"name", "version", "chainId", "verifyingContract"})
_HEX_ADDRESS: Final = re.compile(r"0[xX][0-9a-fA-F]{40}")


@dataclass(frozen=True, slots=True)
class DomainPattern:
    """An allowed EIP-712 domain: a request's domain must equal it on every field given."""

    name: str | None = None
    version: str | None = None
    chain_id: int | None = None
    verifying_contract: bytes | None = None

    def matches(self, domain: Mapping[str, Any]) -> bool:
        if self.name is not None and domain.get("name") != self.name:
            return False
        if self.version is not None and domain.get("version") != self.version:
            return False
        if self.chain_id is not None and _domain_int(domain.get("chainId")) != self.chain_id:
            return False
        return self.verifying_contract is None or (
            _domain_address(domain.get("verifyingContract")) == self.verifying_contract
        )


@dataclass(frozen=True, slots=True)
class Rule:
    """One grant. ``None`` constraints are absent from the file (see docs/POLICY.md)."""

    name: str
    clients: frozenset[str]
    key_labels: frozenset[str]
    operations: frozenset[Operation]
    chains: frozenset[str]
    chain_ids: frozenset[int] | None = None
    to_allowlist: frozenset[bytes] | None = None
    max_value_per_tx: int | None = None
    max_value_per_window: int | None = None
    window_seconds: int = DEFAULT_WINDOW_SECONDS
    count_fees_in_window: bool = False
    """A transaction's worst-case fee counts toward ``max_value_per_window`` with its value."""
    max_fee_per_tx: int | None = None
    max_fee_per_gas: int | None = None
    contract_selectors: frozenset[bytes] = frozenset()
    any_contract_call: bool = False
    """``contract_selectors = ["*"]``: calls with any data are allowed."""
    allow_contract_creation: bool = False
    eip712_domains: tuple[DomainPattern, ...] = ()
    blind_signing: bool = False

    def covers(self, intent: SigningIntent) -> bool:
        """Whether this rule speaks about the request at all: its client, key, operation
        and chain.

        A key is covered if it carries one of the rule's labels; a key to be created only if
        it asks for at least one label and all of them are the rule's (so a rule for "hot"
        keys cannot mint keys that other rules treat as "cold").
        """
        if intent.operation is Operation.KEYS_CREATE:
            wanted = intent.key_labels
            labelled = ANY in self.key_labels or (bool(wanted) and wanted <= self.key_labels)
        else:
            labelled = labels_match(self.key_labels, intent.key_labels)
        return (
            labelled
            and (ANY in self.clients or intent.client_id in self.clients)
            and intent.operation in self.operations
            and intent.chain in self.chains
        )

    def refusal(self, intent: SigningIntent) -> str | None:
        """Why this covering rule refuses ``intent`` (spend windows aside), or ``None``."""
        op = intent.operation
        if self.chain_ids is not None:
            if intent.chain_id is not None and intent.chain_id not in self.chain_ids:
                return f"chain id {intent.chain_id} is not in chain_ids {sorted(self.chain_ids)}"
            if intent.chain_id is None and op is Operation.SIGN_TRANSACTION:
                return "a transaction without a chain id (no EIP-155) is not allowed by chain_ids"
        if intent.creates_contract:
            if not self.allow_contract_creation:
                return "contract creation is not allowed (allow_contract_creation = false)"
        else:
            if (
                intent.to is not None
                and self.to_allowlist is not None
                and intent.to not in self.to_allowlist
            ):
                return f"destination {to_checksum_address(intent.to)} is not in to_allowlist"
            if intent.has_data and not self.any_contract_call:
                if not self.contract_selectors:
                    return "contract calls are not allowed (no contract_selectors)"
                if intent.data_selector is None:
                    return "call data shorter than a 4-byte selector is not allowed"
                if intent.data_selector not in self.contract_selectors:
                    return f"selector 0x{intent.data_selector.hex()} is not in contract_selectors"
        if self.max_value_per_tx is not None and intent.value > self.max_value_per_tx:
            return f"value {intent.value} exceeds max_value_per_tx {self.max_value_per_tx}"
        if self.max_fee_per_tx is not None and intent.fee > self.max_fee_per_tx:
            return (
                f"fee {intent.fee} (gas {intent.gas} at {intent.fee_per_gas} per gas) "
                f"exceeds max_fee_per_tx {self.max_fee_per_tx}"
            )
        per_gas_limit = self.max_fee_per_gas
        if per_gas_limit is not None and intent.fee_per_gas > per_gas_limit:
            return f"fee per gas {intent.fee_per_gas} exceeds max_fee_per_gas {per_gas_limit}"
        if op is Operation.SIGN_TYPED_DATA:
            if intent.eip712_domain is None:
                return "typed data without a domain is not allowed"
            if not any(pattern.matches(intent.eip712_domain) for pattern in self.eip712_domains):
                shown = _describe_domain(intent.eip712_domain)
                return f"EIP-712 domain {shown} matches no entry of eip712_domains"
        return None

    def counted(self, intent: SigningIntent) -> int:
        """What ``intent`` counts toward ``max_value_per_window``: its value, plus its
        worst-case fee with ``count_fees_in_window``."""
        return intent.value + intent.fee if self.count_fees_in_window else intent.value


@dataclass(frozen=True, slots=True)
class Policy:
    """A validated policy file: its rules in file order and the SHA-256 of its bytes."""

    rules: tuple[Rule, ...]
    sha256: str
    _by_name: Mapping[str, Rule] = field(init=False, repr=False, compare=False)
    """The rules by name (names are unique): every signature's commit looks its rule up."""

    def __post_init__(self) -> None:
        by_name = {rule.name: rule for rule in reversed(self.rules)}  # the first of a name
        object.__setattr__(self, "_by_name", by_name)

    def __repr__(self) -> str:
        return f"Policy(rules={len(self.rules)}, sha256={self.sha256[:16]}...)"

    def rule(self, name: str) -> Rule | None:
        return self._by_name.get(name)

    @classmethod
    def from_bytes(cls, data: bytes) -> Policy:
        """Validate a policy file given as bytes (as the host hands it to the enclave)."""
        try:
            document = tomllib.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigurationError(f"policy file is not valid TOML: {exc}") from None
        unknown = set(document) - _FILE_KEYS
        if unknown:
            raise ConfigurationError(f"policy file: unknown keys {sorted(unknown)}")
        if document.get("version") != 1:
            raise ConfigurationError("policy file: version = 1 is required")
        entries = document.get("rules", [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ConfigurationError("policy file: [[rules]] must be an array of tables")
        rules = tuple(_parse_rule(index, entry) for index, entry in enumerate(entries))
        names = [rule.name for rule in rules]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigurationError(f"policy file: rule names used twice: {duplicates}")
        return cls(rules, hashlib.sha256(data).hexdigest())


class PolicyHolder(Reloadable[Policy]):
    """The policy in force; a bad file is refused on reload and the old policy stays."""

    kind = "policy"

    @staticmethod
    def parse(data: bytes) -> Policy:
        return Policy.from_bytes(data)


def _parse_rule(index: int, entry: Mapping[str, Any]) -> Rule:
    name = entry.get("name")
    if (
        not isinstance(name, str)
        or not 0 < len(name) <= MAX_RULE_NAME_LENGTH
        or not name.isprintable()
    ):
        raise ConfigurationError(
            f"policy rules[{index}]: name must be 1-{MAX_RULE_NAME_LENGTH} printable characters"
        )
    try:
        return _build_rule(name, entry)
    except (ConfigurationError, InvalidField) as exc:
        raise ConfigurationError(f"policy rule {name!r}: {exc.message}") from None


def _build_rule(name: str, entry: Mapping[str, Any]) -> Rule:
    unknown = set(entry) - _RULE_KEYS
    if unknown:
        raise ConfigurationError(f"unknown keys {sorted(unknown)}")
    clients = _wildcard_list(entry, "clients")
    for client in clients - {ANY}:
        check_client_id(client)
    key_labels = _wildcard_list(entry, "key_labels")
    operations = set()
    for op in _strings(entry, "operations", required=True):
        try:
            operations.add(Operation(op))
        except ValueError:
            known = sorted(o.value for o in Operation)
            raise ConfigurationError(f"unknown operation {op!r} (known: {known})") from None
    chains = frozenset(_strings(entry, "chains", required=True))
    if not chains:
        raise ConfigurationError("chains must not be empty")

    chain_ids = None
    if "chain_ids" in entry:
        raw = entry["chain_ids"]
        if not isinstance(raw, list) or not all(_is_int(i) and i >= 0 for i in raw):
            raise ConfigurationError("chain_ids must be a list of non-negative integers")
        chain_ids = frozenset(raw)
    to_allowlist = None
    if "to_allowlist" in entry:
        to_allowlist = frozenset(parse_address(a) for a in _strings(entry, "to_allowlist"))
    selector_texts = _strings(entry, "contract_selectors")
    any_call = ANY in selector_texts
    if any_call and len(selector_texts) > 1:
        raise ConfigurationError("contract_selectors ['*'] cannot be mixed with selectors")
    selectors = frozenset(parse_selector(s) for s in selector_texts if s != ANY)
    domains = tuple(_domain(d) for d in _tables(entry, "eip712_domains"))

    max_per_tx = _amount(entry, "max_value_per_tx")
    max_per_window = _amount(entry, "max_value_per_window")
    window = entry.get("window_seconds", DEFAULT_WINDOW_SECONDS)
    if "window_seconds" in entry and max_per_window is None:
        raise ConfigurationError("window_seconds needs max_value_per_window")
    if not _is_int(window) or window <= 0:
        raise ConfigurationError("window_seconds must be a positive integer")
    count_fees = _flag(entry, "count_fees_in_window")
    if "count_fees_in_window" in entry and max_per_window is None:
        raise ConfigurationError("count_fees_in_window needs max_value_per_window")
    creation = _flag(entry, "allow_contract_creation")
    blind = _flag(entry, "blind_signing")
    if Operation.SIGN_HASH in operations and not blind:
        raise ConfigurationError("sign:hash is blind signing: it needs blind_signing = true")
    if blind and Operation.SIGN_HASH not in operations:
        raise ConfigurationError("blind_signing = true without sign:hash in operations")
    if Operation.SIGN_TYPED_DATA in operations and not domains:
        raise ConfigurationError("sign:typed_data needs eip712_domains to allow")
    return Rule(
        name=name,
        clients=clients,
        key_labels=key_labels,
        operations=frozenset(operations),
        chains=chains,
        chain_ids=chain_ids,
        to_allowlist=to_allowlist,
        max_value_per_tx=max_per_tx,
        max_value_per_window=max_per_window,
        window_seconds=window,
        count_fees_in_window=count_fees,
        max_fee_per_tx=_amount(entry, "max_fee_per_tx"),
        max_fee_per_gas=_amount(entry, "max_fee_per_gas"),
        contract_selectors=selectors,
        any_contract_call=any_call,
        allow_contract_creation=creation,
        eip712_domains=domains,
        blind_signing=blind,
    )


def _strings(entry: Mapping[str, Any], key: str, *, required: bool = False) -> list[str]:
    if key not in entry and not required:
        return []
    value = entry.get(key)
    if not isinstance(value, list) or not all(isinstance(i, str) and i for i in value):
        raise ConfigurationError(f"{key} must be a list of non-empty strings")
    if required and not value:
        raise ConfigurationError(f"{key} must not be empty")
    return value


def _wildcard_list(entry: Mapping[str, Any], key: str) -> frozenset[str]:
    values = frozenset(_strings(entry, key, required=True))
    if ANY in values and len(values) > 1:
        raise ConfigurationError(f"{key} ['*'] cannot be mixed with names")
    return values


def _tables(entry: Mapping[str, Any], key: str) -> Sequence[Mapping[str, Any]]:
    value = entry.get(key, [])
    if not isinstance(value, list) or not all(isinstance(i, dict) for i in value):
        raise ConfigurationError(f"{key} must be a list of tables")
    return value


def _domain(table: Mapping[str, Any]) -> DomainPattern:
    unknown = set(table) - _DOMAIN_KEYS
    if unknown:
        raise ConfigurationError(f"eip712_domains: unknown keys {sorted(unknown)}")
    if not table:
        raise ConfigurationError("eip712_domains: an entry must give at least one field")
    for key in ("name", "version"):
        if key in table and not isinstance(table[key], str):
            raise ConfigurationError(f"eip712_domains: {key} must be a string")
    chain_id = table.get("chainId")
    if chain_id is not None and (not _is_int(chain_id) or chain_id < 0):
        raise ConfigurationError("eip712_domains: chainId must be a non-negative integer")
    contract = table.get("verifyingContract")
    return DomainPattern(
        name=table.get("name"),
        version=table.get("version"),
        chain_id=chain_id,
        verifying_contract=None if contract is None else parse_address(contract),
    )


def _amount(entry: Mapping[str, Any], key: str) -> int | None:
    if key not in entry:
        return None
    value = entry[key]
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if not _is_int(value) or value < 0:
        raise ConfigurationError(f"{key} must be a non-negative integer (wei), as int or string")
    if value > MAX_VALUE:
        raise ConfigurationError(f"{key} is larger than 2**256 - 1")
    return int(value)


def _flag(entry: Mapping[str, Any], key: str) -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):
        raise ConfigurationError(f"{key} must be true or false")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _domain_int(value: object) -> int | None:
    """A domain's chainId. The gate gives the domain as it is signed, the chainId as the
    integer the digest encodes (and refuses a chainId of any type but uintN), so text is
    read as no chain at all: "0x1" may have been signed as a string."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _domain_address(value: object) -> bytes | None:
    """A domain's verifyingContract as 20 bytes, whatever its case."""
    if isinstance(value, bytes):
        return value if len(value) == 20 else None
    if isinstance(value, str) and _HEX_ADDRESS.fullmatch(value):
        return bytes.fromhex(value[2:])
    return None


def _describe_domain(domain: Mapping[str, Any]) -> str:
    """A short, printable description of a request's domain for a refusal message."""
    parts = []
    for key in ("name", "version", "chainId", "verifyingContract"):
        if key in domain:
            text = repr(domain[key])
            parts.append(f"{key}={text[:48]}{'...' if len(text) > 48 else ''}")
    return "{" + ", ".join(parts) + "}"
