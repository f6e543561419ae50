"""Configuration that can be replaced while running, and never by a bad file.

The clients registry and the policy are both read from a file and swapped without a restart.
A :class:`Reloadable` holds the value in force: :meth:`Reloadable.replace` parses the new
bytes first and swaps only if they are valid, so a bad file is refused (the error is logged
and raised to the caller) and the old value stays. Readers take :attr:`Reloadable.current`
once per request and use that snapshot throughout; the swap is a single reference
assignment.

The two files are one configuration (a policy names the clients the clients file
registers): :func:`reload_together` reads and parses every file first and swaps them only if
all are good, so a bad file keeps its partner out too (and, given a lock its readers take,
swaps them as one). A reload refused answers a :class:`ReloadRefusal`, which names the files
refused as data; :class:`ReloadHistory` remembers how the last reload went, for ``/readyz``
and the metrics.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final, Generic, Literal, Self, TypeVar

from signd.auth.clients import ClientsRegistry
from signd.errors import ConfigurationError, ConfigurationRefused, SigndError

T = TypeVar("T")

SETTLE_SECONDS = 0.2
"""How long a file read for a reload must stay the same before it is taken: a file being
written in place is not put in force half written (a prefix can be valid and looser: a
rule cut before its limits)."""
SETTLE_ATTEMPTS = 10

log = logging.getLogger(__name__)


class Reloadable(ABC, Generic[T]):
    """The value in force, parsed from a file's bytes by :meth:`parse`.

    ``path`` is where :meth:`reload` reads from; inside an enclave, where the host hands
    the bytes over, :meth:`replace` is called with them directly.
    """

    kind: ClassVar[str]
    """What the file is, for logs and errors: "clients", "policy"."""

    def __init__(self, data: bytes, *, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self._lock = threading.Lock()
        self._current = self.parse(data)
        self._sha256 = hashlib.sha256(data).hexdigest()
        log.info("%s loaded, sha256 %s", self.kind, self._sha256)

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Read and parse the file at ``path``; it is also where :meth:`reload` reads."""
        return cls(_read(cls.kind, Path(path)), path=path)

    @staticmethod
    @abstractmethod
    def parse(data: bytes) -> T:
        """Validate the file's bytes; raise :class:`~signd.errors.ConfigurationError`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sha256={self._sha256[:16]}..., path={self.path})"

    @property
    def current(self) -> T:
        return self._current

    @property
    def sha256(self) -> str:
        """SHA-256 (hex) of the bytes the value in force was parsed from."""
        return self._sha256

    def replace(self, data: bytes) -> T:
        """Parse ``data`` and make it the value in force; on any error keep the old one."""
        with self._lock:
            value = self._parsed(data)
            self._put(value, data)
            return value

    def reload(self) -> T:
        """Re-read :attr:`path` and :meth:`replace` the value with it."""
        staged = self.stage()
        self.put_in_force(staged)
        return staged.value

    def stage(self) -> Staged[T]:
        """Re-read :attr:`path` (settled, :func:`read_settled`) and parse it, without putting
        it in force; a bad or unreadable file is logged and refused
        (:class:`~signd.errors.ConfigurationRefused`, naming it first: ``"policy: ..."``)."""
        if self.path is None:
            raise file_refused(self.kind, f"the {self.kind} file was not loaded from a path")
        try:
            data = read_settled(self.kind, self.path)
        except ConfigurationError as exc:
            log.error("%s refused, keeping sha256 %s: %s", self.kind, self._sha256, exc)
            raise
        try:
            value = self._parsed(data)
        except ConfigurationError as exc:
            raise file_refused(self.kind, exc.message) from None
        return Staged(self, value, data)

    def put_in_force(self, staged: Staged[T]) -> None:
        """Make the value :meth:`stage` read (for this holder) the one in force."""
        with self._lock:
            self._put(staged.value, staged.data)

    def _parsed(self, data: bytes) -> T:
        try:
            return self.parse(data)
        except ConfigurationError as exc:
            log.error("%s refused, keeping sha256 %s: %s", self.kind, self._sha256, exc)
            raise

    def _put(self, value: T, data: bytes) -> None:
        self._current = value
        self._sha256 = hashlib.sha256(data).hexdigest()
        log.info("%s reloaded, sha256 %s", self.kind, self._sha256)


@dataclass(frozen=True, slots=True)
class Staged(Generic[T]):
    """A file read and parsed for ``holder``, not yet in force."""

    holder: Reloadable[T]
    value: T
    data: bytes


@dataclass(frozen=True, slots=True)
class ReloadRefusal:
    """Why a reload put none of the files in force. ``files`` names the files refused
    ("clients", "policy"), by whoever found them bad; none when the fault lay elsewhere (an
    enclave that did not answer). ``reason`` says why, one problem per file naming it first
    (``"clients: ...; policy: ..."``): for the log only, as it may quote a client id or a
    rule name."""

    files: tuple[str, ...]
    reason: str

    @classmethod
    def of(cls, error: SigndError) -> ReloadRefusal:
        """The refusal ``error`` tells: its files if it is a
        :class:`~signd.errors.ConfigurationRefused`, else none."""
        files = error.files if isinstance(error, ConfigurationRefused) else ()
        return cls(files, error.message)


def reload_together(
    holders: Sequence[Reloadable[Any]], *, lock: AbstractContextManager[Any] | None = None
) -> ReloadRefusal | None:
    """Re-read every holder's file and put them all in force, or none: each is read (settled)
    and parsed first, and only when every one is good are they swapped, holding ``lock``
    (which a reader of the values as one configuration takes as well, so that it never
    reads one file's new value beside another's old one). The refusal naming each file
    refused, or ``None`` when all were put in force."""
    staged: list[Staged[Any]] = []
    refused: list[str] = []
    problems: list[str] = []
    for holder in holders:
        try:
            staged.append(holder.stage())
        except ConfigurationRefused as exc:
            refused.extend(exc.files)
            problems.append(exc.message)
    if problems:
        kept = ", ".join(f"{holder.kind} sha256 {holder.sha256}" for holder in holders)
        log.error("reload refused, none of the files taken, keeping %s", kept)
        return ReloadRefusal(tuple(refused), "; ".join(problems))
    with nullcontext() if lock is None else lock:
        for each in staged:
            each.holder.put_in_force(each)
    return None


class ClientsHolder(Reloadable[ClientsRegistry]):
    """The clients registry in force; give it to :class:`~signd.auth.RequestVerifier`."""

    kind = "clients"

    @staticmethod
    def parse(data: bytes) -> ClientsRegistry:
        return ClientsRegistry.from_bytes(data)


ReloadState = Literal["loaded", "reloaded", "refused"]
RELOAD_OUTCOMES: Final[tuple[ReloadState, ...]] = ("reloaded", "refused")
"""What a reload can end in (the labels of the reload counter)."""
UNEXPECTED_FAILURE: Final = "the reload failed unexpectedly (the server log has the error)"


@dataclass(frozen=True, slots=True)
class ReloadStatus:
    """How the last reload of the clients and policy files went, and what is in force.

    ``state`` is ``loaded`` until the first reload (``at`` is then when the files were
    loaded), else the last reload's outcome; ``refusal`` says why it was refused. ``counts``
    are the reloads so far by outcome; the SHA-256 are those of the files in force (``None``
    when unknown)."""

    state: ReloadState
    at: float
    refusal: ReloadRefusal | None
    counts: Mapping[str, int]
    clients_sha256: str | None
    policy_sha256: str | None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form ``/readyz`` answers with (no counts: those are metrics). ``/readyz``
        is public, so a refusal names only the files refused (:func:`public_reason`): the
        reason itself, which may quote a client id or a rule name, stays in the log."""
        shown: dict[str, Any] = {"status": self.state, "at": self.at}
        if self.refusal is not None:
            shown["reason"] = public_reason(self.refusal.files)
        in_force = {"clients_sha256": self.clients_sha256, "policy_sha256": self.policy_sha256}
        shown["in_force"] = {name: value for name, value in in_force.items() if value}
        return shown


RELOADED_FILES: Final = ("clients", "policy")
"""The files a reload reads."""


def public_reason(files: Sequence[str]) -> str:
    """A refusal of ``files`` told publicly, naming only the files a reload reads (in their
    order) and never why: ``"clients: refused; policy: refused (the service log says
    why)"``."""
    refused = [kind for kind in RELOADED_FILES if kind in files]
    if not refused:
        return "refused (the service log says why)"
    return "; ".join(f"{kind}: refused" for kind in refused) + " (the service log says why)"


class ReloadHistory:
    """The last reload's outcome and how many reloads ended each way; thread-safe. ``now``
    gives unix time."""

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self._now = now
        self._lock = threading.Lock()
        self._state: ReloadState = "loaded"
        self._at = now()
        self._refusal: ReloadRefusal | None = None
        self._counts: dict[str, int] = dict.fromkeys(RELOAD_OUTCOMES, 0)

    def run(self, reload: Callable[[], ReloadRefusal | None]) -> ReloadRefusal | None:
        """Call ``reload`` (it answers its refusal, ``None`` when the files were put in
        force) and record its outcome; one that raises is recorded as refused, then raised."""
        try:
            refusal = reload()
        except Exception:
            self._record(ReloadRefusal((), UNEXPECTED_FAILURE))
            raise
        self._record(refusal)
        return refusal

    def status(self, clients_sha256: str | None, policy_sha256: str | None) -> ReloadStatus:
        """The last outcome, with the SHA-256 of the files in force as the gate says."""
        with self._lock:
            return ReloadStatus(
                self._state,
                self._at,
                self._refusal,
                dict(self._counts),
                clients_sha256,
                policy_sha256,
            )

    def _record(self, refusal: ReloadRefusal | None) -> None:
        with self._lock:
            self._state = "reloaded" if refusal is None else "refused"
            self._at = self._now()
            self._refusal = refusal
            self._counts[self._state] += 1


def read_settled(kind: str, path: Path) -> bytes:
    """The bytes of the ``kind`` file at ``path`` once they stay the same for
    :data:`SETTLE_SECONDS`. A file that cannot be read, or is still changing after
    :data:`SETTLE_ATTEMPTS` reads, is refused (:func:`file_refused`: ``"policy: ..."``)."""
    try:
        data = _read(kind, path)
        for _ in range(SETTLE_ATTEMPTS):
            time.sleep(SETTLE_SECONDS)
            again = _read(kind, path)
            if again == data:
                return data
            data = again
    except ConfigurationError as exc:
        raise file_refused(kind, exc.message) from None
    raise file_refused(
        kind,
        f"the {kind} file {path} kept changing while it was read: write it whole (to a "
        "temporary file, then rename it) and reload again",
    )


def file_refused(kind: str, problem: str) -> ConfigurationRefused:
    """The ``kind`` file refused for ``problem``: named in the refusal's files, and first in
    its message as every reload problem is (``"policy: ..."``), whichever gate reports it."""
    return ConfigurationRefused(f"{kind}: {problem}", files=[kind])


def _read(kind: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the {kind} file {path}: {exc.strerror}") from None
