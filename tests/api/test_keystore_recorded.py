"""``signd serve`` and the ``signd`` command on a home whose keystore file went missing while
signd was stopped: refused (503, ``/readyz`` naming it; a one-line CLI error), never created
anew, and served again once the file is back, with the keys it held signing again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import coincurve
import httpx
import pytest

from tests.api.conftest import PASSPHRASE, make_home
from tests.api.processes import AUTH, SigndProcess, signd_serve
from tests.fixtures.servers import (  # noqa: F401 - registers the fixtures
    postgres_schema_dsn,
    postgres_server_fixture,
)

pytestmark = pytest.mark.integration

HASH = "0x" + "42" * 32


@pytest.fixture(params=["sqlite", "postgres"])
def home(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A keystore-only home whose metadata store is SQLite (``metadata.db``) or PostgreSQL."""
    extra = ""
    if request.param == "postgres":
        dsn = request.getfixturevalue("postgres_schema_dsn")
        extra = f'\n[metadata]\ntype = "postgres"\ndsn = "{dsn}"\n'
    return make_home(tmp_path / "home", extra=extra)


def post(server: SigndProcess, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=30, headers=AUTH)


def signs(server: SigndProcess, key: dict[str, Any]) -> bool:
    """The key signs through the service, and the signature recovers its public key."""
    answer = post(server, "/v1/sign/hash", {"key": key["key_id"], "hash": HASH})
    assert answer.status_code == 200, answer.text
    recovered = coincurve.PublicKey.from_signature_and_message(
        bytes.fromhex(answer.json()["signature"][2:]), bytes.fromhex(HASH[2:]), hasher=None
    )
    return "0x" + recovered.format(compressed=True).hex() == key["public_key"]


def keystore_part(server: SigndProcess) -> tuple[int, dict[str, str]]:
    ready = httpx.get(f"{server.url}/readyz", timeout=30)
    [part] = [p for p in ready.json()["parts"] if p["part"] == "custody:keystore"]
    return ready.status_code, part


def test_serve_refuses_a_missing_keystore_whose_keys_are_recorded_then_recovers(
    home: Path, tmp_path: Path
) -> None:
    wallet = home / "wallet.data"
    with signd_serve(home, "--allow-blind-signing") as server:
        answer = post(server, "/v1/keys", {"chain": "ethereum", "custody": "keystore", "count": 2})
        assert answer.status_code == 201, answer.text
        keys = answer.json()["keys"]
        assert all(signs(server, key) for key in keys)
        assert server.stop() == 0
    wallet.rename(tmp_path / "wallet.moved")  # deleted, or its volume not mounted

    with signd_serve(home, "--allow-blind-signing") as server:
        status, part = keystore_part(server)
        assert status == 503
        assert part["status"] == "unavailable"
        assert part["code"] == "dependency_unavailable"
        assert f"the keystore {wallet} is missing, but 2 keys" in part["message"]
        for path, body in (
            ("/v1/sign/hash", {"key": keys[0]["key_id"], "hash": HASH}),
            ("/v1/keys", {"chain": "ethereum", "custody": "keystore"}),
        ):
            refused = post(server, path, body)
            assert refused.status_code == 503, refused.text
            error = refused.json()["error"]
            assert error["code"] == "dependency_unavailable"
            assert str(wallet) in error["message"]
        assert not wallet.exists()

        (tmp_path / "wallet.moved").rename(wallet)  # back, while signd runs
        status, part = keystore_part(server)
        assert (status, part["status"]) == (200, "ok")
        assert all(signs(server, key) for key in keys)
        assert server.stop() == 0
        log = server.log.read_text()
    assert f"custody keystore is unavailable: the keystore {wallet} is missing" in log
    assert "Traceback" not in log


def signd(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real ``signd`` command, in a process of its own."""
    env = {**os.environ, "SIGND_KEYSTORE_PASSPHRASE": PASSPHRASE}
    env.pop("SIGND_HOME", None)
    return subprocess.run(
        [sys.executable, "-m", "signd", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_the_command_refuses_a_missing_keystore_whose_keys_are_recorded(
    home: Path, tmp_path: Path
) -> None:
    wallet = home / "wallet.data"
    made = signd(home, "keys", "new", "--custody", "keystore", "--count", "3", "--json")
    assert made.returncode == 0, made.stderr
    wallet.rename(tmp_path / "wallet.moved")

    refused = signd(home, "keys", "new", "--custody", "keystore")
    assert refused.returncode == 1
    assert refused.stderr.startswith("error dependency_unavailable: the keystore ")
    assert f"{wallet} is missing, but 3 keys of it are recorded" in refused.stderr
    assert "give it a new [keystore] path" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not wallet.exists()

    (tmp_path / "wallet.moved").rename(wallet)
    listed = signd(home, "keys", "list", "--custody", "keystore", "--json")
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.split('"key_id"')) - 1 == 3
