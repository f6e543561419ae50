"""A PKCS#11 module as signd loads it: once per file per process, initialised for threads.

python-pkcs11 calls ``C_Initialize(NULL)``, which by the PKCS#11 threading rules promises the
module that no two threads ever call it at once; SoftHSM2 then turns its internal mutexes off
and concurrent ``C_Sign`` calls in different sessions corrupt its heap. So right after
python-pkcs11 loads a module, :class:`Pkcs11Library` finalises it and initialises it again
through ctypes with ``CKF_OS_LOCKING_OK``: then any number of threads may call it, one per
session at a time. A module that cannot lock (``CKR_CANT_LOCK``) is initialised without
threads and every call is serialised instead.

Re-initialising (``C_Finalize`` + ``C_Initialize``) is how a client recovers from a token that
disappeared and came back; it must not overlap any other call, which :class:`CallGate`
guarantees.

A PIN a token refused is never sent to it again by this process (CloudHSM locks a crypto user
after a few failed logins): :meth:`Pkcs11Library.login` raises :class:`PinRefused` for it at
once. A different PIN (the PIN's source changed) is tried.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import pkcs11

from signd.crypto.secret import Secret
from signd.errors import ConfigurationError, DependencyUnavailable

CKR_OK = 0x000
CKR_CANT_LOCK = 0x00A
CKR_PIN_INCORRECT = 0x0A0
CKR_PIN_INVALID = 0x0A1
CKR_PIN_LEN_RANGE = 0x0A2
CKR_PIN_EXPIRED = 0x0A3
CKR_PIN_LOCKED = 0x0A4
CKR_USER_ALREADY_LOGGED_IN = 0x100
CKR_USER_PIN_NOT_INITIALIZED = 0x102
CKR_CRYPTOKI_NOT_INITIALIZED = 0x190
CKF_OS_LOCKING_OK = 0x002
CKU_USER = 1
CKS_RO_USER_FUNCTIONS = 1
CKS_RW_USER_FUNCTIONS = 3

_PIN_REFUSED = {
    CKR_PIN_INCORRECT: "the HSM PIN is incorrect",
    CKR_PIN_INVALID: "the HSM PIN is invalid",
    CKR_PIN_LEN_RANGE: "the HSM PIN has the wrong length",
    CKR_PIN_EXPIRED: "the HSM PIN has expired",
    CKR_PIN_LOCKED: "the HSM user PIN is locked",
}

logger = logging.getLogger(__name__)


class PinRefused(DependencyUnavailable):
    """The token refused signd's PIN: signd's configuration, not the caller, is at fault.

    A 503 rather than a 403 because no request can be refused for it and the HSM can be put
    right while signd runs; signd does not send that PIN again (a restart or a new PIN does).
    """


_RV = ctypes.c_ulong
_ULONG = ctypes.c_ulong


class _InitializeArgs(ctypes.Structure):
    _fields_ = (
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", _ULONG),
        ("pReserved", ctypes.c_void_p),
    )


class _SessionInfo(ctypes.Structure):
    _fields_ = (
        ("slotID", _ULONG),
        ("state", _ULONG),
        ("flags", _ULONG),
        ("ulDeviceError", _ULONG),
    )


_VoidFn = ctypes.CFUNCTYPE(_RV, ctypes.c_void_p)
_LoginFn = ctypes.CFUNCTYPE(_RV, _ULONG, _ULONG, ctypes.c_char_p, _ULONG)
_SessionInfoFn = ctypes.CFUNCTYPE(_RV, _ULONG, ctypes.POINTER(_SessionInfo))


class _FunctionList(ctypes.Structure):
    """The head of CK_FUNCTION_LIST, up to C_Login (the order is fixed by the standard)."""

    _fields_ = (
        ("major", ctypes.c_ubyte),
        ("minor", ctypes.c_ubyte),
        ("C_Initialize", _VoidFn),
        ("C_Finalize", _VoidFn),
        *(
            (name, ctypes.c_void_p)
            for name in (
                "C_GetInfo",
                "C_GetFunctionList",
                "C_GetSlotList",
                "C_GetSlotInfo",
                "C_GetTokenInfo",
                "C_GetMechanismList",
                "C_GetMechanismInfo",
                "C_InitToken",
                "C_InitPIN",
                "C_SetPIN",
                "C_OpenSession",
                "C_CloseSession",
                "C_CloseAllSessions",
            )
        ),
        ("C_GetSessionInfo", _SessionInfoFn),
        ("C_GetOperationState", ctypes.c_void_p),
        ("C_SetOperationState", ctypes.c_void_p),
        ("C_Login", _LoginFn),
    )


class CallGate:
    """Many concurrent module calls, or one re-initialisation, never both.

    Writers (re-initialisations) are preferred so a busy signer cannot starve recovery. With
    ``serialized`` every call is exclusive, for modules initialised without locking.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._exclusive = False
        self._writers_waiting = 0
        self.serialized = False

    @contextmanager
    def call(self) -> Iterator[None]:
        """Hold while calling into the module."""
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def enter(self) -> None:
        """Begin a module call (what :meth:`call` does, without a generator on the hot path)."""
        with self._cond:
            while self._exclusive or self._writers_waiting or (self.serialized and self._active):
                self._cond.wait()
            self._active += 1

    def leave(self) -> None:
        """End a module call begun with :meth:`enter`."""
        with self._cond:
            self._active -= 1
            if not self._active and (self._writers_waiting or self.serialized):
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold while no other thread may be inside the module."""
        with self._cond:
            self._writers_waiting += 1
            while self._exclusive or self._active:
                self._cond.wait()
            self._writers_waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class Pkcs11Library:
    """One loaded, thread-initialised PKCS#11 module, shared by every backend in the process."""

    _by_path: ClassVar[dict[Path, Pkcs11Library]] = {}
    _by_file: ClassVar[dict[tuple[int, int], Pkcs11Library]] = {}
    _loaded_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: Path, lib: Any, functions: _FunctionList) -> None:
        self.path = path
        self.lib = lib
        self.gate = CallGate()
        self.generation = 0
        """Bumped on every re-initialisation; sessions of an older generation are dead."""
        self._functions = functions
        self._login_lock = threading.Lock()
        self._pin_mark_key = os.urandom(32)
        self._refused_pins: dict[bytes, str] = {}
        """Why a slot's token refused a PIN, by an HMAC of both under a per-process key."""
        self._initialize()

    @classmethod
    def load(cls, module_path: Path) -> Pkcs11Library:
        """The library at ``module_path``, loaded and initialised on first use.

        The dynamic loader gives every name of one file the same library, which must not be
        initialised twice; so a module is known by its path with symbolic links resolved and
        by its file's identity (device and inode), which hard links share. The path is
        checked first: a file replaced under a loaded path is a new inode, but the loader
        still hands out the library it loaded from that path.
        """
        path = Path(os.path.realpath(module_path.expanduser()))
        with cls._loaded_lock:
            library = cls._by_path.get(path)
            if library is not None:
                return library
            identity = _file_identity(path)
            library = cls._by_file.get(identity)
            if library is None:
                functions = _function_list(path)
                try:
                    lib = pkcs11.lib(str(path))
                except pkcs11.PKCS11Error as exc:
                    raise DependencyUnavailable(
                        f"PKCS#11 module {path} failed to initialise ({type(exc).__name__}); "
                        "check its configuration (SOFTHSM2_CONF, the CloudHSM client config)"
                    ) from None
                library = cls._by_file[identity] = cls(path, lib, functions)
            cls._by_path[path] = library
            return library

    def _initialize(self) -> None:
        """Finalise whatever state the module has and initialise it for OS-locked threads."""
        self._functions.C_Finalize(None)
        args = _InitializeArgs(None, None, None, None, CKF_OS_LOCKING_OK, None)
        rv = self._functions.C_Initialize(ctypes.cast(ctypes.byref(args), ctypes.c_void_p))
        if rv == CKR_CANT_LOCK:
            rv = self._functions.C_Initialize(None)
            self.gate.serialized = True
        if rv != CKR_OK:
            raise DependencyUnavailable(
                f"PKCS#11 module {self.path} failed to initialise (CKR 0x{rv:x})"
            )

    def reinitialize(self, seen_generation: int) -> None:
        """Re-initialise the module, unless someone already did since ``seen_generation``."""
        with self.gate.exclusive():
            if self.generation != seen_generation:
                return
            self.generation += 1
            self._initialize()

    def login(self, session_handle: int, pin: Secret) -> None:  # safe: not a log
        """``C_Login`` as the normal user; an already logged-in application is fine; a PIN the
        token refused before is :class:`PinRefused` without a login.

        Login state belongs to the application, not the session, and lasts until its last
        session on the token closes, so no backend ever calls ``C_Logout``.
        """
        pin_bytes = pin.reveal_bytes()
        slot = self._session_info(session_handle).slotID.to_bytes(8, "big")
        mark = hmac.new(self._pin_mark_key, slot + pin_bytes, hashlib.sha256).digest()
        with self._login_lock:
            refused = self._refused_pins.get(mark)
            if refused is not None:
                raise PinRefused(refused)
            rv = self._functions.C_Login(session_handle, CKU_USER, pin_bytes, len(pin_bytes))
            if rv in (CKR_OK, CKR_USER_ALREADY_LOGGED_IN):
                return
            if rv in _PIN_REFUSED:
                refused = self._refused_pins[mark] = (
                    f"the HSM refused signd's PIN: {_PIN_REFUSED[rv]}; signd does not try that "
                    "PIN again: correct it (or reset it on the HSM) and restart signd"
                )
                logger.error("%s (PKCS#11 module %s)", refused, self.path)
                raise PinRefused(refused)
        if rv == CKR_USER_PIN_NOT_INITIALIZED:
            raise ConfigurationError("the HSM token's user PIN is not initialised")
        raise _exception_for(rv)

    def is_logged_in(self, session_handle: int) -> bool:
        """Whether a session still acts as the logged-in user (``C_GetSessionInfo``)."""
        return self._session_info(session_handle).state in (
            CKS_RO_USER_FUNCTIONS,
            CKS_RW_USER_FUNCTIONS,
        )

    def _session_info(self, session_handle: int) -> _SessionInfo:
        info = _SessionInfo()
        rv = self._functions.C_GetSessionInfo(session_handle, ctypes.byref(info))
        if rv != CKR_OK:
            raise _exception_for(rv)
        return info


def _file_identity(path: Path) -> tuple[int, int]:
    """The device and inode of the module file; a missing file is a configuration error."""
    try:
        status = path.stat()
    except OSError:
        raise ConfigurationError(f"PKCS#11 module {path} does not exist") from None
    return status.st_dev, status.st_ino


def _function_list(path: Path) -> _FunctionList:
    """The module's CK_FUNCTION_LIST; a missing or foreign library is a configuration error."""
    if not path.is_file():
        raise ConfigurationError(f"PKCS#11 module {path} does not exist")
    try:
        dll = ctypes.CDLL(str(path))
        get_function_list = dll.C_GetFunctionList
    except (OSError, AttributeError):
        raise ConfigurationError(f"{path} is not a loadable PKCS#11 module") from None
    get_function_list.argtypes = (ctypes.POINTER(ctypes.POINTER(_FunctionList)),)
    get_function_list.restype = _RV
    pointer = ctypes.POINTER(_FunctionList)()
    if get_function_list(ctypes.byref(pointer)) != CKR_OK or not pointer:
        raise ConfigurationError(f"{path} did not return a PKCS#11 function list")
    return pointer.contents


_ERRORS_BY_RV: dict[int, type[pkcs11.PKCS11Error]] = {
    0x002: pkcs11.exceptions.HostMemory,
    0x005: pkcs11.exceptions.GeneralError,
    0x030: pkcs11.exceptions.DeviceError,
    0x031: pkcs11.exceptions.DeviceMemory,
    0x032: pkcs11.exceptions.DeviceRemoved,
    0x0B0: pkcs11.exceptions.SessionClosed,
    0x0B3: pkcs11.exceptions.SessionHandleInvalid,
    0x0E0: pkcs11.exceptions.TokenNotPresent,
    0x101: pkcs11.exceptions.UserNotLoggedIn,
}


def _exception_for(rv: int) -> pkcs11.PKCS11Error:
    """The python-pkcs11 exception for a return value, so callers handle one family."""
    error_type = _ERRORS_BY_RV.get(rv)
    return error_type() if error_type is not None else pkcs11.PKCS11Error(f"CKR 0x{rv:x}")
