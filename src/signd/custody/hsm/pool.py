"""A pool of logged-in PKCS#11 sessions, and the reconnect-and-retry-once around every call.

Each session is used by one thread at a time (the PKCS#11 threading rule) and keeps its own
cache of private-key object handles. A failed call is one of three things:

- **gone**: the error itself says the session, the login, the token or the module is no
  longer usable (``CKR_SESSION_HANDLE_INVALID``, ``CKR_TOKEN_NOT_PRESENT``,
  ``CKR_DEVICE_REMOVED``, ``CKR_CRYPTOKI_NOT_INITIALIZED``, ...). The pool is dropped and
  reopened — re-initialising the module only if reopening alone does not work — and the call
  retried once. While the token stays away every request fails fast with
  DependencyUnavailable, a reconnection being attempted at most every ``reconnect_interval``
  seconds, and the first request after it returns succeeds.
- **a device fault**: the device failed this call (``CKR_DEVICE_ERROR``, ``CKR_GENERAL_ERROR``,
  ``CKR_FUNCTION_FAILED``, and for a call that names them the errors the token's state can
  cause, such as ``CKR_TEMPLATE_INCONSISTENT`` for signd's fixed key template). Whether the
  token is gone is then asked of it on the same session (``C_GetTokenInfo``,
  ``C_GetSessionInfo``): if it does not answer, it is gone; if it does, the pool is kept, the
  call retried once, and a second failure is :class:`TokenFailed` (DependencyUnavailable).
  Dropping the pool for nothing would log out, and closing sessions and re-initialising the
  module end the calls of every other thread (SoftHSM2 even marks a read-only token invalid
  when signd logs in again, so that only a re-initialisation brings it back).
- **the request or the configuration**: translated once (:func:`translate`), never retried.
  A token that cannot make or use secp256k1 keys (``CKR_MECHANISM_INVALID``,
  ``CKR_CURVE_NOT_SUPPORTED``, ...) is one of these: CustodyUnsupported, a 503 saying so.

A refused PIN is not a PKCS#11 error here: every request fails with PinRefused until signd is
restarted.

A session belongs to the module generation it was opened in. Re-initialising the module ends
every session, and the module then hands out the same handle numbers again, to new sessions
that other threads lease: a call with an old handle — even closing it — would act on another
thread's session, and SoftHSM2 frees a session closed under a thread that is using it. So a
session of an older generation is never used or closed, only dropped.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pkcs11
from pkcs11 import Attribute, Mechanism, ObjectClass
from pkcs11 import exceptions as p11

from signd.custody.hsm.library import PinRefused, Pkcs11Library
from signd.custody.hsm.settings import HsmSettings
from signd.errors import (
    CapacityExceeded,
    ConfigurationError,
    CustodyUnsupported,
    DependencyUnavailable,
    IntegrityError,
    SigndError,
)

T = TypeVar("T")


class TokenMissing(pkcs11.PKCS11Error):
    """No token matches the configured label or slot."""


class StaleSession(pkcs11.PKCS11Error):
    """The module was re-initialised since the session was opened: its handle is not ours."""


class CurveNotSupported(pkcs11.PKCS11Error):
    """CKR_CURVE_NOT_SUPPORTED (PKCS#11 3.0), which python-pkcs11 raises as a bare
    ``PKCS11Error`` that would read as a module gone: see :func:`recognised`."""


CKR_CURVE_NOT_SUPPORTED = 0x140
_UNMAPPED = re.compile(r"Unmapped error code (0x[0-9a-fA-F]+)")
_NEWER_ERRORS: dict[int, type[pkcs11.PKCS11Error]] = {CKR_CURVE_NOT_SUPPORTED: CurveNotSupported}


def recognised(exc: pkcs11.PKCS11Error) -> pkcs11.PKCS11Error:
    """``exc``, or the error class of its return value when python-pkcs11 did not know it
    (it says so only in the message: ``Unmapped error code 0x140``)."""
    if type(exc) is not pkcs11.PKCS11Error or not exc.args:
        return exc
    unmapped = _UNMAPPED.fullmatch(str(exc.args[0]))
    error_type = _NEWER_ERRORS.get(int(unmapped.group(1), 16)) if unmapped else None
    return error_type() if error_type is not None else exc


class TokenFailed(DependencyUnavailable):
    """The token failed a call twice while it still answered; ``error`` is the last PKCS#11
    error, so the caller can say what it means for its call."""

    def __init__(self, message: str, error: type[pkcs11.PKCS11Error]) -> None:
        super().__init__(message)
        self.error = error


PKCS11ErrorTypes = tuple[type[pkcs11.PKCS11Error], ...]

_GONE_ERRORS: PKCS11ErrorTypes = (
    TokenMissing,
    StaleSession,
    p11.SessionHandleInvalid,
    p11.SessionClosed,
    p11.UserNotLoggedIn,
    p11.DeviceRemoved,
    p11.TokenNotPresent,
    p11.TokenNotRecognised,
)
"""The session, its login, the token or the device is gone: reconnect."""
_DEVICE_FAULTS: PKCS11ErrorTypes = (p11.DeviceError, p11.GeneralError, p11.FunctionFailed)
"""The device failed the call; whether it is gone as well is asked of it."""
TEMPLATE_ERRORS: PKCS11ErrorTypes = (
    p11.TemplateInconsistent,
    p11.TemplateIncomplete,
    p11.AttributeValueInvalid,
    p11.AttributeTypeInvalid,
    p11.AttributeReadOnly,
)
"""A template refused: a configuration error, unless the call names them token-state errors."""
SECP256K1_REFUSALS: PKCS11ErrorTypes = (
    p11.MechanismInvalid,
    p11.MechanismParamInvalid,
    p11.DomainParamsInvalid,
    CurveNotSupported,
)
"""What a token answers signd's fixed CKM_EC_KEY_PAIR_GEN or CKM_ECDSA call with when it
cannot make or use secp256k1 keys."""
_UNSUPPORTED_ERRORS: PKCS11ErrorTypes = (p11.FunctionNotSupported, *TEMPLATE_ERRORS)


def is_gone(exc: pkcs11.PKCS11Error) -> bool:
    """Whether an error itself says the sessions, login, token or module are gone.

    A bare ``PKCS11Error`` is what python-pkcs11 raises for CKR_CRYPTOKI_NOT_INITIALIZED
    (someone finalised the module) and for codes it does not know.
    """
    return isinstance(exc, _GONE_ERRORS) or type(exc) is pkcs11.PKCS11Error


def reopening_may_help(exc: pkcs11.PKCS11Error) -> bool:
    """Whether opening sessions failed because of the token or module, not the settings.

    A device fault counts here: the call that failed (``C_GetTokenInfo``, ``C_OpenSession``,
    ``C_Login``) is itself the question whether the token is usable, and SoftHSM2 answers
    CKR_GENERAL_ERROR for a token it marked invalid until the module is re-initialised.
    """
    return is_gone(exc) or isinstance(exc, _DEVICE_FAULTS)


def translate(exc: pkcs11.PKCS11Error, doing: str, where: str = "HSM token") -> SigndError:
    """The signd error for a PKCS#11 failure; the message names the operation, not secrets."""
    name = type(exc).__name__
    if isinstance(exc, p11.DeviceMemory | p11.HostMemory):
        return CapacityExceeded(
            f"the HSM is out of memory while {doing} ({name}); key quota reached?"
        )
    if isinstance(exc, SECP256K1_REFUSALS):
        return secp256k1_unsupported(where, f"it refused {doing} with {name}")
    if isinstance(exc, _UNSUPPORTED_ERRORS):
        return ConfigurationError(f"the HSM token does not support {doing} ({name})")
    if isinstance(exc, p11.SessionCount):
        return DependencyUnavailable(f"the HSM has no free sessions ({name}); lower hsm.pool_size")
    return DependencyUnavailable(f"the HSM failed while {doing} ({name})")


def secp256k1_unsupported(where: str, evidence: str) -> CustodyUnsupported:
    """The 503 for a token that cannot make or use secp256k1 keys, with what to check."""
    return CustodyUnsupported(
        f"the {where} does not support secp256k1: {evidence}. signd needs CKM_EC_KEY_PAIR_GEN "
        "and CKM_ECDSA on the curve secp256k1 (OID 1.3.132.0.10); check that the PKCS#11 "
        "module supports that curve and that neither mechanism is disabled for the token "
        "(SoftHSM2: slots.mechanisms in softhsm2.conf), then restart signd"
    )


class PooledSession:
    """One open session, with private-key handles cached by CKA_ID.

    Opened (and so created) inside a module call, it records the module generation then.
    """

    def __init__(self, session: Any, library: Pkcs11Library, generation: int) -> None:
        self.session = session
        self.generation = generation
        self.module_generation = library.generation
        self._library = library
        self._keys: dict[bytes, Any] = {}

    @property
    def stale(self) -> bool:
        """Whether the module was re-initialised since: the handles may name others' objects.

        Stable while the caller is inside a module call (:class:`CallGate`).
        """
        return self.module_generation != self._library.generation

    def private_key(self, cka_id: bytes) -> Any:
        """The private key object with this CKA_ID (cached; IntegrityError when absent)."""
        key = self._keys.get(cka_id)
        if key is None:
            search = self.session.get_objects(
                {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: cka_id}
            )
            try:
                found = list(itertools.islice(search, 2))
            finally:
                search.close()  # C_FindObjectsFinal now, not from a __del__ in another thread
            if not found:
                self.check_token()
                raise IntegrityError(
                    f"the HSM token holds no private key with CKA_ID {cka_id.hex()}"
                )
            if len(found) > 1:
                raise IntegrityError(
                    f"the HSM token holds several private keys with CKA_ID {cka_id.hex()}"
                )
            key = self._keys[cka_id] = found[0]
        return key

    def sign(self, cka_id: bytes, digest: bytes) -> bytes:
        """Raw ``CKM_ECDSA`` over a 32-byte digest: r‖s as the device returns it."""
        try:
            return bytes(self.private_key(cka_id).sign(digest, mechanism=Mechanism.ECDSA))
        except (p11.ObjectHandleInvalid, p11.KeyHandleInvalid):
            self._keys.pop(cka_id, None)
            return bytes(self.private_key(cka_id).sign(digest, mechanism=Mechanism.ECDSA))

    def check_token(self) -> None:
        """Raise a reconnect-class error unless the token is present and we are logged in."""
        self.session.token.slot.get_token()
        if not self._library.is_logged_in(self.session.handle):
            raise p11.UserNotLoggedIn()

    def close(self) -> None:
        """Close the session (caller inside a module call); a stale one is only dropped."""
        self._keys.clear()
        if self.stale:
            return
        try:
            self.session.close()
        except pkcs11.PKCS11Error:
            return


class SessionPool:
    """``pool_size`` sessions on one token, logged in once, leased one thread at a time."""

    def __init__(
        self,
        library: Pkcs11Library,
        settings: HsmSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._library = library
        self._settings = settings
        self._clock = clock
        self._cond = threading.Condition()
        self._idle: list[PooledSession] = []
        self._generation = 0
        self._connected = False
        self._ever_connected = False
        self._closed = False
        self._last_error: SigndError | None = None
        self._retry_at = 0.0

    @property
    def where(self) -> str:
        """The token and module, as error messages name them."""
        return f"HSM token with {self._settings.token_description} in {self._library.path}"

    def connect(self) -> None:
        """Open the sessions now, so a bad module, token or PIN shows at start-up."""
        with self._cond:
            if not self._connected:
                self._connect_locked()

    def run(
        self,
        op: Callable[[PooledSession], T],
        doing: str,
        token_state_errors: PKCS11ErrorTypes = (),
    ) -> T:
        """Run ``op`` on a leased session and retry once after a fault of the token,
        reconnecting first if the sessions, login, token or module are gone.

        ``token_state_errors`` are errors that, for this call, come from the token's state
        rather than the request (e.g. a key template the token accepted before): they are
        device faults here instead of configuration errors.
        """
        failed: type[pkcs11.PKCS11Error] = pkcs11.PKCS11Error
        gone = False
        gate = self._library.gate
        for _ in range(2):
            pooled = self._acquire()
            try:
                gate.enter()
                try:
                    if pooled.stale:
                        raise StaleSession()
                    return op(pooled)
                except pkcs11.PKCS11Error as raised:
                    exc = recognised(raised)
                    failed = type(exc)
                    gone = self._gone_after(exc, pooled, doing, token_state_errors)
                finally:
                    gate.leave()
            finally:
                self._release(pooled)
            if gone:
                self._invalidate(pooled.generation)
        if gone:
            raise DependencyUnavailable(
                f"the {self.where} became unavailable while {doing} "
                f"({failed.__name__}); signd reconnects when it is back"
            )
        raise TokenFailed(
            f"the {self.where} failed while {doing} ({failed.__name__}); it still answers, so "
            "signd kept its sessions. Retrying helps only if the fault was passing: if it "
            "recurs, check the token's health and the HSM's own log",
            failed,
        )

    def _gone_after(
        self,
        exc: pkcs11.PKCS11Error,
        pooled: PooledSession,
        doing: str,
        token_state_errors: PKCS11ErrorTypes,
    ) -> bool:
        """After ``exc`` on ``pooled`` (caller inside the module call): whether the sessions,
        login, token or module are gone (True) or the token failed this call but still answers
        on this session (False); any other error is raised as its signd error."""
        if is_gone(exc):
            return True
        if not isinstance(exc, _DEVICE_FAULTS + token_state_errors):
            raise translate(exc, doing, self.where) from None
        try:
            pooled.check_token()
        except pkcs11.PKCS11Error:
            return True
        return False

    def close(self) -> None:
        """Close idle sessions now and leased ones when they come back."""
        with self._cond:
            self._closed = True
            self._generation += 1
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        self._discard(idle)

    def _acquire(self) -> PooledSession:
        """An idle session, connecting first if needed; waits up to ``acquire_timeout``."""
        with self._cond:
            deadline: float | None = None
            while True:
                if self._closed:
                    raise DependencyUnavailable("the HSM backend is closed")
                if not self._connected:
                    self._connect_locked()
                if self._idle:
                    return self._idle.pop()
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self._settings.acquire_timeout
                if now >= deadline:
                    raise DependencyUnavailable(
                        f"all {self._settings.pool_size} HSM sessions stayed busy for "
                        f"{self._settings.acquire_timeout:g} s"
                    )
                self._cond.wait(deadline - now)

    def _release(self, pooled: PooledSession) -> None:
        """Give a session back, or close it if the pool moved on (reconnected or closed)."""
        with self._cond:
            keep = pooled.generation == self._generation and not self._closed
            if keep:
                self._idle.append(pooled)
                self._cond.notify()
        if not keep:
            self._discard([pooled])

    def _invalidate(self, generation: int) -> None:
        """Drop every session of ``generation`` (once, however many threads saw it fail)."""
        with self._cond:
            if generation != self._generation:
                return
            self._generation += 1
            self._connected = False
            idle, self._idle = self._idle, []
        self._discard(idle)

    def _discard(self, sessions: list[PooledSession]) -> None:
        if sessions:
            with self._library.gate.call():
                for pooled in sessions:
                    pooled.close()

    def _connect_locked(self) -> None:
        """Open the pool (caller holds ``_cond``); fail fast while the last try is recent."""
        now = self._clock()
        last = self._last_error
        if last is not None and (isinstance(last, PinRefused) or now < self._retry_at):
            raise type(last)(last.message)
        try:
            self._idle = self._open_sessions()
        except SigndError as exc:
            self._last_error, self._retry_at = exc, now + self._settings.reconnect_interval
            raise
        self._connected, self._ever_connected, self._last_error = True, True, None

    def _open_sessions(self) -> list[PooledSession]:
        """Open the pool; re-initialise the module and try again only if the token or the
        module failed the opening (a token that left the slot list comes back only so)."""
        seen = self._library.generation
        try:
            return self._try_open()
        except pkcs11.PKCS11Error as exc:
            if not reopening_may_help(exc) or (
                isinstance(exc, TokenMissing) and not self._ever_connected
            ):
                raise self._open_error(exc) from None
        self._library.reinitialize(seen)
        try:
            return self._try_open()
        except pkcs11.PKCS11Error as exc:
            raise self._open_error(exc) from None

    def _open_error(self, exc: pkcs11.PKCS11Error) -> SigndError:
        if isinstance(exc, TokenMissing):
            if self._ever_connected:
                return DependencyUnavailable(
                    f"the {self.where} is not present; signd reconnects when it is back"
                )
            return ConfigurationError(f"there is no {self.where}; tokens present: {exc}")
        if reopening_may_help(exc):
            return DependencyUnavailable(
                f"cannot open sessions on the {self.where} ({type(exc).__name__})"
            )
        return translate(exc, f"opening sessions on the {self.where}")

    def _try_open(self) -> list[PooledSession]:
        with self._library.gate.call():
            token = self._find_token()
            opened: list[Any] = []
            try:
                for _ in range(self._settings.pool_size):
                    opened.append(token.open(rw=True))
                self._library.login(opened[0].handle, self._settings.pin)  # safe: a login call
            except BaseException:
                for session in opened:
                    PooledSession(session, self._library, -1).close()
                raise
            return [PooledSession(s, self._library, self._generation) for s in opened]

    def _find_token(self) -> Any:
        lib = self._library.lib
        settings = self._settings
        if settings.token_label is not None:
            try:
                return lib.get_token(token_label=settings.token_label)
            except p11.NoSuchToken:
                raise TokenMissing(self._present_tokens()) from None
            except p11.MultipleTokensReturned:
                raise ConfigurationError(
                    f"several HSM tokens are labelled {settings.token_label!r}; use hsm.slot"
                ) from None
        for slot in lib.get_slots():
            if slot.slot_id == settings.slot:
                try:
                    return slot.get_token()
                except (p11.TokenNotPresent, p11.TokenNotRecognised):
                    break
        raise TokenMissing(self._present_tokens())

    def _present_tokens(self) -> str:
        try:
            return (
                ", ".join(
                    f"{t.label!r} (slot {t.slot.slot_id})" for t in self._library.lib.get_tokens()
                )
                or "none"
            )
        except pkcs11.PKCS11Error:
            return "unknown"
