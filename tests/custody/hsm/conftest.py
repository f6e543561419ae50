"""SoftHSM2 for the HSM tests: a token directory in a temp folder, tokens made with softhsm2-util.

Without softhsm2 the tests skip, unless ``CI`` is set: then they fail, since CI installs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import coincurve
import pytest

from signd.crypto.hashing import keccak256
from signd.crypto.secret import Secret
from signd.custody.hsm import HsmBackend, HsmSettings
from signd.storage.sqlite import SqliteMetadataStore

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
USER_PIN = "4815-user-pin-1623"
SO_PIN = "so-pin-4242"
MAIN_TOKEN = "signd-main"
LOSS_TOKEN = "signd-loss"
PIN_TOKEN = "signd-pin"
WIPE_TOKEN = "signd-wipe"
TOKENS = (MAIN_TOKEN, LOSS_TOKEN, PIN_TOKEN, WIPE_TOKEN)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def eth_address(public_key: bytes) -> str:
    """Lower-case Ethereum address of a SEC1 public key, computed here with keccak."""
    uncompressed = coincurve.PublicKey(public_key).format(compressed=False)
    return "0x" + keccak256(uncompressed[1:])[-20:].hex()


@dataclass
class SoftHsm:
    """A SoftHSM2 installation with its own token directory."""

    module: Path
    conf: Path
    tokendir: Path

    def init_token(self, label: str, pin: str = USER_PIN) -> None:
        subprocess.run(
            [
                "softhsm2-util",
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                pin,
                "--so-pin",
                SO_PIN,
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
        )

    def token_dir(self, label: str) -> Path:
        """The folder SoftHSM2 keeps a token in (its token.object names the label)."""
        for folder in self.tokendir.iterdir():
            token_object = folder / "token.object"
            if token_object.exists() and label.encode() in token_object.read_bytes():
                return folder
        raise LookupError(label)

    def settings(self, label: str = MAIN_TOKEN, pin: str = USER_PIN, **kwargs: Any) -> HsmSettings:
        return HsmSettings(module_path=self.module, token_label=label, pin=Secret(pin), **kwargs)


@pytest.fixture(scope="session")
def softhsm() -> Iterator[SoftHsm]:
    """SoftHSM2 with four initialised tokens; SOFTHSM2_CONF set for the whole session."""
    module = next((Path(p) for p in MODULE_CANDIDATES if Path(p).exists()), None)
    if module is None or shutil.which("softhsm2-util") is None:
        reason = "softhsm2 is not installed (apt-get install -y softhsm2)"
        if _in_ci():
            pytest.fail(f"{reason}; CI is set, so this is an error, not a skip", pytrace=False)
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="signd-softhsm-"))
    tokendir = base / "tokens"
    tokendir.mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokendir}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    saved = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    hsm = SoftHsm(module, conf, tokendir)
    try:
        for label in TOKENS:
            hsm.init_token(label)
        yield hsm
    finally:
        if saved is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = saved
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def metadata(tmp_path: Path) -> Iterator[SqliteMetadataStore]:
    store = SqliteMetadataStore(tmp_path / "metadata.db")
    yield store
    store.close()


@pytest.fixture
def backend(softhsm: SoftHsm, metadata: SqliteMetadataStore) -> Iterator[HsmBackend]:
    """An HSM backend on the main token with a pool of 4 sessions."""
    hsm = HsmBackend(softhsm.settings(pool_size=4), metadata)
    yield hsm
    hsm.close()
