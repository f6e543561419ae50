"""SIGND_KEYSTORE_PASSPHRASE: a service takes it out of its environment once read; the
operator's commands leave it there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from signd.config import load_settings
from signd.crypto.secret import Secret
from signd.operations.backends import keystore_passphrase_source

PASSPHRASE = "keystore passphrase from the environment"
SHOW_THE_VARIABLE = "import os; print(os.environ.get('SIGND_KEYSTORE_PASSPHRASE'))"


def variable_in_a_child() -> str:
    done = subprocess.run(
        [sys.executable, "-c", SHOW_THE_VARIABLE],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def test_a_service_takes_it_out_of_its_environment_and_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIGND_KEYSTORE_PASSPHRASE", PASSPHRASE)
    source = keystore_passphrase_source(load_settings(tmp_path), take_from_environment=True)
    assert source(False) == Secret(PASSPHRASE)
    assert "SIGND_KEYSTORE_PASSPHRASE" not in os.environ
    assert variable_in_a_child() == "None"
    assert source(False) == Secret(PASSPHRASE)  # the keystore opened again, in this process


def test_the_operators_commands_leave_it_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command reads it and exits; tools that run several commands in one process read it
    once per command."""
    monkeypatch.setenv("SIGND_KEYSTORE_PASSPHRASE", PASSPHRASE)
    source = keystore_passphrase_source(load_settings(tmp_path))
    assert source(False) == Secret(PASSPHRASE)
    assert os.environ["SIGND_KEYSTORE_PASSPHRASE"] == PASSPHRASE
