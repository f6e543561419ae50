"""Refusing core files and same-user ptrace: what ``signd enclave`` and ``signd kms-server``
do as they start."""

from __future__ import annotations

import ctypes
import errno
import logging
import resource
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from signd import hardening


def test_a_process_that_asks_is_no_longer_dumpable_and_writes_no_core_file() -> None:
    """Run in a child process: both settings are process-wide and cannot be undone."""
    program = textwrap.dedent(
        """
        import ctypes, logging, resource
        from signd.hardening import refuse_core_dumps_and_attach

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        print(prctl(3, 0, 0, 0, 0))
        refuse_core_dumps_and_attach()
        print(prctl(3, 0, 0, 0, 0), *resource.getrlimit(resource.RLIMIT_CORE))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["1", "0 0 0"]
    assert "INFO core files and same-user ptrace attach are off" in done.stderr


class RefusingLibc:
    """A C library whose prctl fails with EPERM."""

    def prctl(self, *arguments: Any) -> int:
        ctypes.set_errno(errno.EPERM)
        return -1


def test_steps_that_fail_are_warnings_and_the_process_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse_limit(*arguments: Any) -> None:
        raise ValueError("not allowed to raise limit")

    monkeypatch.setattr(resource, "setrlimit", refuse_limit)
    monkeypatch.setattr(ctypes, "CDLL", lambda *arguments, **options: RefusingLibc())
    caplog.set_level(logging.INFO, logger="signd.hardening")
    hardening.refuse_core_dumps_and_attach()
    assert [(record.levelname, record.getMessage()) for record in caplog.records] == [
        ("WARNING", "could not turn core files off (RLIMIT_CORE): not allowed to raise limit"),
        (
            "WARNING",
            "could not make this process non-dumpable (PR_SET_DUMPABLE): Operation not permitted",
        ),
    ]


def test_elsewhere_than_linux_it_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_limit_expected(*arguments: Any) -> None:
        raise AssertionError("setrlimit called")

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(resource, "setrlimit", no_limit_expected)
    hardening.refuse_core_dumps_and_attach()
