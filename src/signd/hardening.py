"""Keeping the memory of a process that holds keys out of core files and debuggers.

``signd enclave`` holds unsealed private keys in its cache and ``signd kms-server`` its key
material. :func:`refuse_core_dumps_and_attach`, called as each starts, sets the core file size
limit to 0 and clears the process's dumpable flag (``prctl(PR_SET_DUMPABLE, 0)``): the kernel
then writes no core file on a crash, and processes of the same user can no longer ``ptrace``
it or read its ``/proc/<pid>/mem`` and ``environ``. Root (``CAP_SYS_PTRACE``) still can.

Standard library only: the enclave imports it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import sys
from typing import Final

log = logging.getLogger(__name__)

PR_SET_DUMPABLE: Final = 4


def refuse_core_dumps_and_attach() -> None:
    """No core file, no same-user ptrace for this process (Linux; elsewhere nothing).

    A step that fails is logged as a warning, and the process starts all the same.
    """
    if not sys.platform.startswith("linux"):
        return
    core_files_off = _no_core_files()
    dumpable_off = _not_dumpable()
    if core_files_off and dumpable_off:
        log.info("core files and same-user ptrace attach are off for this process")


def _no_core_files() -> bool:
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        log.warning("could not turn core files off (RLIMIT_CORE): %s", exc)
        return False
    return True


def _not_dumpable() -> bool:
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError) as exc:
        log.warning("could not find prctl to make this process non-dumpable: %s", exc)
        return False
    if prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        reason = os.strerror(ctypes.get_errno())
        log.warning("could not make this process non-dumpable (PR_SET_DUMPABLE): %s", reason)
        return False
    return True
