"""Audit records, sealed inside the enclave into a MAC'ed hash chain.

Every key creation and signing decision, allowed or refused, becomes an
:class:`AuditRecord`. The enclave's :class:`AuditSigner` seals it::

    canonical = canonical JSON of the record (sorted keys, no spaces, ASCII)
    mac       = HMAC-SHA256(mac_key, canonical || prev_hash)
    hash      = SHA-256(prev_hash || canonical || mac)

where ``prev_hash`` is the previous record's ``hash`` (32 zero bytes before the first
record, whose ``seq`` is 1). The host only appends sealed records: without the MAC key it
cannot alter, insert or reorder them undetected, and a removal breaks the chain.

A signing that used up spend-window allowance carries its :class:`Spend`, so that the
windows can be rebuilt from the log's tail after a restart. Records without one (no spend,
or written before the field existed) leave ``spend`` out of their canonical form, so their
MACs verify as before.

One decision may cover several signatures: the hash or message items of one request signed
with one key under the same rule. Their record lists each result's digest, in request order,
in ``results_sha256`` (and ``result_sha256`` is null); other records leave that field out.

A gate's record names the configuration its decision was made under: ``policy_sha256`` and
``clients_sha256``, the SHA-256 of the policy and clients files in force (precomputed when
the file was loaded). Records sealed before these fields existed, and records of no decision
(``audit:resume``), leave them out.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii as _quote
from typing import Any, Final, Literal

from signd.crypto.secret import Secret
from signd.errors import ConfigurationError, IntegrityError

HASH_SIZE: Final = 32
GENESIS_HASH: Final = bytes(HASH_SIZE)
MIN_MAC_KEY_BYTES: Final = 32

Verdict = Literal["allowed", "refused"]
_VERDICTS: Final = ("allowed", "refused")
_OPTIONAL_TEXT: Final = (
    "client_id",
    "key_id",
    "chain",
    "rule",
    "request_sha256",
    "result_sha256",
    "policy_sha256",
    "clients_sha256",
)
_OPTIONAL_FIELDS: Final = frozenset({"spend", "results_sha256", "policy_sha256", "clients_sha256"})
"""Fields a record has only when they hold something (never as ``null``)."""


@dataclass(frozen=True, slots=True)
class ChainHead:
    """Where a chain ends: the last record's ``seq`` and ``hash`` (``0`` and zeros if
    empty)."""

    seq: int
    hash: bytes


GENESIS: Final = ChainHead(0, GENESIS_HASH)


@dataclass(frozen=True, slots=True)
class Spend:
    """Wei committed to a spend window: ``value`` wei under ``rule`` for ``key_id``
    (the window's key in :class:`~signd.policy.PolicyEngine`): a transaction's value, plus
    its worst-case fee under a rule with ``count_fees_in_window``. ``value`` is written as a
    decimal string, since wei do not fit a JSON number everywhere."""

    rule: str
    key_id: str
    value: int

    def __post_init__(self) -> None:
        if not isinstance(self.rule, str) or not isinstance(self.key_id, str):
            raise IntegrityError("audit record spend rule and key_id must be strings")
        if not isinstance(self.value, int) or isinstance(self.value, bool) or self.value < 1:
            raise IntegrityError("audit record spend value must be a positive integer")

    def to_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "key_id": self.key_id, "value": str(self.value)}

    @classmethod
    def from_dict(cls, data: object) -> Spend:
        if not isinstance(data, Mapping) or set(data) != {"rule", "key_id", "value"}:
            raise IntegrityError("audit record spend has missing or unknown fields")
        value = data["value"]
        if not isinstance(value, str) or not value.isdigit() or not value.isascii():
            raise IntegrityError("audit record spend value must be a decimal string")
        return cls(data["rule"], data["key_id"], int(value))


_TEXT_OR_NONE: Final = (str, type(None))
"""For ``isinstance``: a string or ``None`` (one C call, where a helper function is a Python
call per field of every record sealed)."""


def _digest_list(value: object) -> bool:
    return (
        isinstance(value, tuple)
        and len(value) > 1
        and all(isinstance(digest, str) for digest in value)
    )


def _text(value: str | None) -> str:
    """A JSON string (ASCII, as ``json.dumps`` escapes it) or ``null``."""
    return "null" if value is None else _quote(value)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One decision. ``time`` is RFC 3339 UTC with milliseconds; the two digests are hex
    SHA-256 of the request as received and of the result returned (``None`` if none)."""

    seq: int
    time: str
    node: str
    client_id: str | None
    operation: str
    key_id: str | None
    chain: str | None
    decision: Verdict
    rule: str | None
    reason: str
    request_sha256: str | None
    result_sha256: str | None
    spend: Spend | None = None
    results_sha256: tuple[str, ...] | None = None
    """The digest of each result when one decision covered several signatures, in order."""
    policy_sha256: str | None = None
    """The SHA-256 (hex) of the policy file the decision was made under."""
    clients_sha256: str | None = None
    """The SHA-256 (hex) of the clients file in force when the decision was made."""

    def __post_init__(self) -> None:
        if not isinstance(self.seq, int) or isinstance(self.seq, bool) or self.seq < 1:
            raise IntegrityError("audit record seq must be a positive integer")
        if self.decision not in _VERDICTS:
            raise IntegrityError("audit record decision must be 'allowed' or 'refused'")
        # Written out rather than looped over getattr: every signature seals a record.
        if not (
            isinstance(self.time, str)
            and isinstance(self.node, str)
            and isinstance(self.operation, str)
            and isinstance(self.reason, str)
        ):
            for name in ("time", "node", "operation", "reason"):
                if not isinstance(getattr(self, name), str):
                    raise IntegrityError(f"audit record {name} must be a string")
        if not (
            isinstance(self.client_id, _TEXT_OR_NONE)
            and isinstance(self.key_id, _TEXT_OR_NONE)
            and isinstance(self.chain, _TEXT_OR_NONE)
            and isinstance(self.rule, _TEXT_OR_NONE)
            and isinstance(self.request_sha256, _TEXT_OR_NONE)
            and isinstance(self.result_sha256, _TEXT_OR_NONE)
            and isinstance(self.policy_sha256, _TEXT_OR_NONE)
            and isinstance(self.clients_sha256, _TEXT_OR_NONE)
        ):
            for name in _OPTIONAL_TEXT:
                if not isinstance(getattr(self, name), _TEXT_OR_NONE):
                    raise IntegrityError(f"audit record {name} must be a string or null")
        if self.spend is not None and not isinstance(self.spend, Spend):
            raise IntegrityError("audit record spend must be a Spend or null")
        if self.results_sha256 is not None and not _digest_list(self.results_sha256):
            raise IntegrityError(
                "audit record results_sha256 must be a list of at least two strings"
            )

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON data; ``spend``, ``results_sha256``, ``policy_sha256`` and
        ``clients_sha256`` only when there are."""
        data = {
            "seq": self.seq,
            "time": self.time,
            "node": self.node,
            "client_id": self.client_id,
            "operation": self.operation,
            "key_id": self.key_id,
            "chain": self.chain,
            "decision": self.decision,
            "rule": self.rule,
            "reason": self.reason,
            "request_sha256": self.request_sha256,
            "result_sha256": self.result_sha256,
        }
        if self.spend is not None:
            data["spend"] = self.spend.to_dict()
        if self.results_sha256 is not None:
            data["results_sha256"] = list(self.results_sha256)
        if self.policy_sha256 is not None:
            data["policy_sha256"] = self.policy_sha256
        if self.clients_sha256 is not None:
            data["clients_sha256"] = self.clients_sha256
        return data

    def canonical(self) -> bytes:
        """The bytes the MAC and hash cover: sorted keys, no whitespace, ASCII only.

        Written out field by field (in sorted order, with :mod:`json`'s own string encoder),
        which gives exactly ``json.dumps(self.to_dict(), sort_keys=True, separators=(",",
        ":"), ensure_ascii=True)`` at a fraction of its cost: every signature seals one."""
        spend = ""
        if self.spend is not None:
            spend = (
                f',"spend":{{"key_id":{_quote(self.spend.key_id)},'
                f'"rule":{_quote(self.spend.rule)},"value":"{self.spend.value}"}}'
            )
        results = ""
        if self.results_sha256 is not None:
            results = f',"results_sha256":[{",".join(map(_quote, self.results_sha256))}]'
        clients = ""
        if self.clients_sha256 is not None:
            clients = f',"clients_sha256":{_quote(self.clients_sha256)}'
        policy = ""
        if self.policy_sha256 is not None:
            policy = f',"policy_sha256":{_quote(self.policy_sha256)}'
        return (
            f'{{"chain":{_text(self.chain)},"client_id":{_text(self.client_id)}{clients},'
            f'"decision":{_quote(self.decision)},"key_id":{_text(self.key_id)},'
            f'"node":{_quote(self.node)},"operation":{_quote(self.operation)}{policy},'
            f'"reason":{_quote(self.reason)},"request_sha256":{_text(self.request_sha256)},'
            f'"result_sha256":{_text(self.result_sha256)}{results},"rule":{_text(self.rule)},'
            f'"seq":{self.seq}{spend},"time":{_quote(self.time)}}}'
        ).encode("ascii")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditRecord:
        if not isinstance(data, Mapping):
            raise IntegrityError("audit record has missing or unknown fields")
        names = data.keys()
        if names != _REQUIRED_FIELDS and not _REQUIRED_FIELDS < names <= _ALL_FIELDS:
            raise IntegrityError("audit record has missing or unknown fields")
        values = dict(data)
        if values.get("policy_sha256", "") is None or values.get("clients_sha256", "") is None:
            raise IntegrityError("audit record policy_sha256 and clients_sha256 are never null")
        if "spend" in values:
            values["spend"] = Spend.from_dict(values["spend"])
        if "results_sha256" in values:
            results = values["results_sha256"]
            if not isinstance(results, list):
                raise IntegrityError("audit record results_sha256 must be a list")
            values["results_sha256"] = tuple(results)
        return cls(**values)

    @property
    def timestamp(self) -> float:
        """``time`` as Unix seconds."""
        try:
            return datetime.fromisoformat(self.time.replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise IntegrityError(f"audit record {self.seq} has a bad time") from None


@dataclass(frozen=True, slots=True)
class SealedAuditRecord:
    """A record with its place in the chain: ``prev_hash``, ``mac`` and ``hash``."""

    record: AuditRecord
    prev_hash: bytes
    mac: bytes
    hash: bytes
    canonical: bytes | None = field(default=None, repr=False, compare=False)
    """The record's canonical bytes when the sealer kept them (saves encoding them again)."""

    def to_json(self) -> str:
        """One line of the log (no newline)."""
        if self.canonical is not None:  # the same text json.dumps gives, with sorted keys
            return (
                f'{{"hash":"{self.hash.hex()}","mac":"{self.mac.hex()}",'
                f'"prev_hash":"{self.prev_hash.hex()}","record":{self.canonical.decode("ascii")}}}'
            )
        return json.dumps(
            {
                "record": self.record.to_dict(),
                "prev_hash": self.prev_hash.hex(),
                "mac": self.mac.hex(),
                "hash": self.hash.hex(),
            },
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
        )

    @classmethod
    def from_json(cls, line: str | bytes) -> SealedAuditRecord:
        """Parse one log line; anything malformed is an :class:`~signd.errors.IntegrityError`."""
        try:
            data = json.loads(line)
            if not isinstance(data, dict) or set(data) != {"record", "prev_hash", "mac", "hash"}:
                raise IntegrityError("audit line has missing or unknown fields")
            digests = [bytes.fromhex(data[name]) for name in ("prev_hash", "mac", "hash")]
        except (ValueError, TypeError, UnicodeDecodeError):
            raise IntegrityError("audit line is not valid JSON with hex digests") from None
        if any(len(digest) != HASH_SIZE for digest in digests):
            raise IntegrityError("audit line digests must be 32 bytes")
        try:
            record = AuditRecord.from_dict(data["record"])
        except TypeError:
            raise IntegrityError("audit record has fields of the wrong type") from None
        prev_hash, mac, hash_ = digests
        return cls(record, prev_hash, mac, hash_, record.canonical())

    @property
    def head(self) -> ChainHead:
        return ChainHead(self.record.seq, self.hash)


def compute_mac(mac_key: Secret, canonical: bytes, prev_hash: bytes) -> bytes:
    return hmac.digest(mac_key.reveal_bytes(), canonical + prev_hash, "sha256")


class RecordMac:
    """:func:`compute_mac` for one key: the standard library's HMAC keyed once, and copied
    for each record (its keyed state kept instead of rebuilt), which saves about a quarter
    of ``hmac.digest``'s cost per record. The keyed state is as secret as the key; it lives
    where the key does."""

    __slots__ = ("_keyed",)

    def __init__(self, mac_key: Secret) -> None:
        self._keyed = hmac.new(mac_key.reveal_bytes(), digestmod=hashlib.sha256)

    def __repr__(self) -> str:
        return "RecordMac(<secret>)"

    def __call__(self, canonical: bytes, prev_hash: bytes) -> bytes:
        mac = self._keyed.copy()
        mac.update(canonical)
        mac.update(prev_hash)
        return mac.digest()


def compute_hash(prev_hash: bytes, canonical: bytes, mac: bytes) -> bytes:
    return hashlib.sha256(prev_hash + canonical + mac).digest()


def seal_is_valid(sealed: SealedAuditRecord, mac_key: Secret) -> tuple[bool, bool]:
    """Whether the record's MAC verifies, and whether its stored hash is the right one."""
    canonical = sealed.record.canonical()
    mac_ok = hmac.compare_digest(compute_mac(mac_key, canonical, sealed.prev_hash), sealed.mac)
    hash_ok = compute_hash(sealed.prev_hash, canonical, sealed.mac) == sealed.hash
    return mac_ok, hash_ok


_ALL_FIELDS: Final = frozenset(f.name for f in fields(AuditRecord))
_REQUIRED_FIELDS: Final = _ALL_FIELDS - _OPTIONAL_FIELDS


def rfc3339(timestamp: float) -> str:
    """Unix seconds as ``YYYY-MM-DDTHH:MM:SS.mmmZ``, as ``datetime`` rounds them (to the
    microsecond, then cut to the millisecond); each whole second is formatted once."""
    fraction, whole = math.modf(timestamp)
    micros = round(fraction * 1e6)
    second = int(whole)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    elif micros < 0:
        second, micros = second - 1, micros + 1_000_000
    global _second_text
    cached_second, text = _second_text  # one read: a second and its text, never mixed
    if cached_second != second:
        text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        _second_text = (second, text)
    return f"{text}{micros // 1000:03d}Z"


_second_text: tuple[int, str] = (-1, "")
"""The last whole second :func:`rfc3339` formatted, and its text up to the milliseconds."""


class AuditSigner:
    """Seals records into the chain; lives in the enclave and holds the MAC key.

    ``last`` is the last record of the log the host keeps (``None`` for an empty log): its
    MAC and hash are checked before the chain is continued from it, so the host cannot seed
    the signer with a made-up head. Thread-safe: records are numbered and chained in the
    order :meth:`seal` is called.
    """

    def __init__(
        self,
        mac_key: Secret,
        node: str,
        *,
        last: SealedAuditRecord | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(mac_key, Secret) or len(mac_key.reveal_bytes()) < MIN_MAC_KEY_BYTES:
            raise ConfigurationError(
                f"the audit MAC key must be at least {MIN_MAC_KEY_BYTES} bytes"
            )
        if last is not None and seal_is_valid(last, mac_key) != (True, True):
            raise IntegrityError("the audit log's last record does not verify; not continuing it")
        self._mac = RecordMac(mac_key)
        self.node = node
        self._now = now
        self._head = GENESIS if last is None else last.head
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"AuditSigner(node={self.node!r}, seq={self._head.seq})"

    @property
    def head(self) -> ChainHead:
        return self._head

    def seal(
        self,
        *,
        operation: str,
        decision: Verdict,
        reason: str,
        client_id: str | None = None,
        key_id: str | None = None,
        chain: str | None = None,
        rule: str | None = None,
        request_sha256: str | None = None,
        result_sha256: str | None = None,
        spend: Spend | None = None,
        results_sha256: Sequence[str] | None = None,
        policy_sha256: str | None = None,
        clients_sha256: str | None = None,
    ) -> SealedAuditRecord:
        """Number, time-stamp, MAC and chain one record."""
        with self._lock:
            record = AuditRecord(
                seq=self._head.seq + 1,
                time=rfc3339(self._now()),
                node=self.node,
                client_id=client_id,
                operation=operation,
                key_id=key_id,
                chain=chain,
                decision=decision,
                rule=rule,
                reason=reason,
                request_sha256=request_sha256,
                result_sha256=result_sha256,
                spend=spend,
                results_sha256=None if results_sha256 is None else tuple(results_sha256),
                policy_sha256=policy_sha256,
                clients_sha256=clients_sha256,
            )
            canonical = record.canonical()
            prev_hash = self._head.hash
            mac = self._mac(canonical, prev_hash)
            sealed = SealedAuditRecord(
                record, prev_hash, mac, compute_hash(prev_hash, canonical, mac), canonical
            )
            self._head = sealed.head
            return sealed
