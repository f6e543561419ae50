"""An HSM that cannot make or use secp256k1 keys: a 503 ``custody_unsupported`` saying so.

Real SoftHSM2 where it can show it: its ``slots.mechanisms`` setting takes mechanisms off the
token (it then refuses CKM_ECDSA with CKR_MECHANISM_INVALID, and no longer lists
CKM_EC_KEY_PAIR_GEN), driven through ``signd serve`` in a process of its own, since a process
reads a SoftHSM2 configuration once. The return values SoftHSM2 never gives for signd's calls
(CKR_CURVE_NOT_SUPPORTED, CKR_DOMAIN_PARAMS_INVALID, ...) come from a double of the one
python-pkcs11 call, around the real token, pool and backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pkcs11 import Attribute, PKCS11Error
from pkcs11 import exceptions as p11

from signd.custody.hsm import HsmBackend
from signd.custody.hsm.library import Pkcs11Library
from signd.custody.hsm.pool import PooledSession, SessionPool
from signd.custody.hsm.token import HsmToken
from signd.errors import CustodyUnsupported
from signd.storage.sqlite import SqliteMetadataStore
from tests.api.conftest import PASSPHRASE, make_home
from tests.api.processes import AUTH, signd_serve
from tests.custody.hsm.conftest import MAIN_TOKEN, SO_PIN, USER_PIN, SoftHsm, eth_address

pytestmark = pytest.mark.integration

LABEL = "signd-unsupported"
HASH = "0x" + "42" * 32
OFFERED = "CKM_SHA256,CKM_RSA_PKCS_KEY_PAIR_GEN,CKM_RSA_PKCS,CKM_ECDH1_DERIVE"
"""Mechanisms SoftHSM2 keeps offering in these tests besides the ones each takes away."""

REFUSALS: list[tuple[str, Callable[[], PKCS11Error]]] = [
    ("MechanismInvalid", p11.MechanismInvalid),
    ("MechanismParamInvalid", p11.MechanismParamInvalid),
    ("DomainParamsInvalid", p11.DomainParamsInvalid),
    # what python-pkcs11 0.10 raises for CKR_CURVE_NOT_SUPPORTED, which it does not know
    ("CurveNotSupported", lambda: PKCS11Error("Unmapped error code 0x140")),
]


def assert_says_what_to_check(message: str, refusal: str) -> None:
    assert "does not support secp256k1" in message, message
    assert refusal in message, message
    assert "CKM_EC_KEY_PAIR_GEN and CKM_ECDSA" in message and "1.3.132.0.10" in message
    assert "slots.mechanisms" in message
    assert USER_PIN not in message


def sessions_opened(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the pool's openings from now on (a refusal must not drop the sessions)."""
    opened: list[int] = []
    open_sessions = SessionPool._open_sessions

    def counting(self: SessionPool) -> list[PooledSession]:
        opened.append(1)
        return open_sessions(self)

    monkeypatch.setattr(SessionPool, "_open_sessions", counting)
    return opened


def token_objects(softhsm: SoftHsm, label_prefix: str) -> list[str]:
    """The labels of the objects on the main token whose label starts with ``label_prefix``
    (a backend on it is open, so this process is logged in to it)."""
    token = Pkcs11Library.load(softhsm.module).lib.get_token(token_label=MAIN_TOKEN)
    with token.open() as session:
        labels = [str(found[Attribute.LABEL]) for found in session.get_objects()]
    return [label for label in labels if label.startswith(label_prefix)]


# -- the exact return values, from a double of python-pkcs11's call on the real token


@pytest.mark.parametrize(("refusal", "error"), REFUSALS, ids=[name for name, _ in REFUSALS])
def test_a_refused_key_generation_is_custody_unsupported_and_leaves_nothing(
    softhsm: SoftHsm,
    metadata: SqliteMetadataStore,
    monkeypatch: pytest.MonkeyPatch,
    refusal: str,
    error: Callable[[], PKCS11Error],
) -> None:
    """The token makes the key pair and then refuses (a module breaking the all-or-nothing
    rule, the worst case): a 503 custody_unsupported that says the HSM does not support
    secp256k1 and what to check, not retried, the sessions kept; no object left on the token,
    no record; /readyz's check says the same until a key is made again."""
    prefix = f"signd-refused-{refusal.lower()}"
    backend = HsmBackend(softhsm.settings(key_label_prefix=prefix, pool_size=2), metadata)
    try:
        backend.check_health()
        opened = sessions_opened(monkeypatch)
        calls: list[int] = []
        generate = HsmToken._generate

        def made_then_refused(pooled: PooledSession, cka_id: bytes, label: str) -> bytes:
            calls.append(1)
            generate(pooled, cka_id, label)
            raise error()

        monkeypatch.setattr(HsmToken, "_generate", staticmethod(made_then_refused))
        with pytest.raises(CustodyUnsupported) as raised:
            backend.create_keys("ethereum", eth_address)
        assert raised.value.http_status == 503
        assert raised.value.code == "custody_unsupported"
        assert_says_what_to_check(raised.value.message, refusal)
        assert "generating a secp256k1 key pair" in raised.value.message
        assert len(calls) == 1, "a refusal is not retried"
        assert not opened, "a refusal is no reason to drop the sessions"
        assert token_objects(softhsm, prefix) == []
        assert metadata.list(custody="hsm").records == []
        with pytest.raises(CustodyUnsupported) as unhealthy:
            backend.check_health()
        assert unhealthy.value.message == raised.value.message

        monkeypatch.setattr(HsmToken, "_generate", staticmethod(generate))
        (key,) = backend.create_keys("ethereum", eth_address)
        backend.check_health()
        digest = os.urandom(32)
        assert backend.sign_digest(key, digest).recover_public_key(digest) == key.public_key
        assert token_objects(softhsm, prefix) == [f"{prefix}-{key.key_id}"] * 2
    finally:
        backend.close()


@pytest.mark.parametrize(("refusal", "error"), REFUSALS, ids=[name for name, _ in REFUSALS])
def test_a_refused_signature_is_custody_unsupported_until_one_works(
    backend: HsmBackend,
    monkeypatch: pytest.MonkeyPatch,
    refusal: str,
    error: Callable[[], PKCS11Error],
) -> None:
    """CKM_ECDSA refused on a key the token holds: a 503 custody_unsupported, not retried
    and not taken for a token gone; /readyz's check says so until a signature works."""
    (key,) = backend.create_keys("ethereum", eth_address)
    opened = sessions_opened(monkeypatch)
    calls: list[int] = []

    def refused(self: PooledSession, cka_id: bytes, digest: bytes) -> bytes:
        calls.append(1)
        raise error()

    monkeypatch.setattr(PooledSession, "sign", refused)
    with pytest.raises(CustodyUnsupported) as raised:
        backend.sign_digest(key, os.urandom(32))
    assert raised.value.http_status == 503
    assert_says_what_to_check(raised.value.message, refusal)
    assert "refused signing" in raised.value.message
    assert len(calls) == 1 and not opened
    with pytest.raises(CustodyUnsupported, match="does not support secp256k1"):
        backend.check_health()
    monkeypatch.undo()
    digest = os.urandom(32)
    assert backend.sign_digest(key, digest).recover_public_key(digest) == key.public_key
    backend.check_health()


# -- real SoftHSM2 with mechanisms taken away, through `signd serve`


@dataclass
class RestrictedSoftHsm:
    """A SoftHSM2 configuration of its own, whose ``slots.mechanisms`` a test sets."""

    module: Path
    conf: Path
    tokendir: Path

    def offer(self, mechanisms: str) -> None:
        """Offer only ``mechanisms`` (comma-separated CKM names), or ``ALL``."""
        self.conf.write_text(
            f"directories.tokendir = {self.tokendir}\nobjectstore.backend = file\n"
            f"log.level = ERROR\nslots.mechanisms = {mechanisms}\n"
        )

    @property
    def environment(self) -> dict[str, str]:
        """What a process needs to use the token: this configuration and the PIN."""
        return {"SOFTHSM2_CONF": str(self.conf), "SIGND_HSM_PIN": USER_PIN}

    def objects(self) -> list[str]:
        """The labels of every object on the token, read by a process of their own."""
        script = (
            "import sys, pkcs11\n"
            "token = pkcs11.lib(sys.argv[1]).get_token(token_label=sys.argv[2])\n"
            "with token.open(user_pin=sys.argv[3]) as session:\n"
            "    print('\\n'.join(str(o[pkcs11.Attribute.LABEL]) for o in session.get_objects()))\n"
        )
        listed = subprocess.run(
            [sys.executable, "-c", script, str(self.module), LABEL, USER_PIN],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            env={**os.environ, **self.environment},
        )
        return listed.stdout.split()


@pytest.fixture
def restricted(softhsm: SoftHsm, tmp_path: Path) -> RestrictedSoftHsm:
    """A token of its own under its own configuration, for the processes a test starts (this
    one keeps its own: a re-initialisation of its module reads SOFTHSM2_CONF again)."""
    tokendir = tmp_path / "tokens"
    tokendir.mkdir()
    hsm = RestrictedSoftHsm(softhsm.module, tmp_path / "softhsm2.conf", tokendir)
    hsm.offer("ALL")
    subprocess.run(
        [
            *("softhsm2-util", "--init-token", "--free", "--label", LABEL),
            *("--pin", USER_PIN, "--so-pin", SO_PIN),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "SOFTHSM2_CONF": str(hsm.conf)},
    )
    return hsm


def hsm_home(path: Path, hsm: RestrictedSoftHsm) -> Path:
    extra = f'\n[hsm]\nmodule = "{hsm.module}"\ntoken_label = "{LABEL}"\n'
    return make_home(path, custody=("keystore", "hsm"), extra=extra)


def hsm_part(url: str) -> tuple[int, dict[str, Any]]:
    ready = httpx.get(f"{url}/readyz", timeout=30)
    part = next(part for part in ready.json()["parts"] if part["part"] == "custody:hsm")
    return ready.status_code, part


def config_check(home: Path, hsm: RestrictedSoftHsm) -> dict[str, Any]:
    checked = subprocess.run(
        [sys.executable, "-m", "signd", "--home", str(home), "config", "check", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **hsm.environment, "SIGND_KEYSTORE_PASSPHRASE": PASSPHRASE},
    )
    assert checked.returncode == 1, checked.stdout + checked.stderr
    part: dict[str, Any] = next(
        part for part in json.loads(checked.stdout)["parts"] if part["part"] == "custody:hsm"
    )
    return part


@pytest.fixture
def home(tmp_path: Path, restricted: RestrictedSoftHsm) -> Path:
    return hsm_home(tmp_path / "home", restricted)


def test_a_token_without_key_pair_generation_refuses_creates_and_says_so(
    restricted: RestrictedSoftHsm, home: Path
) -> None:
    """SoftHSM2 with CKM_EC_KEY_PAIR_GEN taken away (it no longer lists it, though it would
    still generate): POST /v1/keys with custody hsm is a 503 custody_unsupported naming the
    mechanism and what to check, and so are /readyz and `signd config check`; no object on
    the token, no record."""
    restricted.offer(f"CKM_ECDSA,{OFFERED}")
    with signd_serve(home, environment=restricted.environment) as server:
        made = httpx.post(
            f"{server.url}/v1/keys",
            json={"chain": "ethereum", "custody": "hsm"},
            timeout=30,
            headers=AUTH,
        )
        assert made.status_code == 503, made.text
        error = made.json()["error"]
        assert error["code"] == "custody_unsupported"
        assert_says_what_to_check(error["message"], "CKM_EC_KEY_PAIR_GEN (C_GetMechanismList)")
        assert f"HSM token with label {LABEL!r}" in error["message"]
        listed = httpx.get(f"{server.url}/v1/keys?custody=hsm", timeout=30, headers=AUTH)
        assert listed.status_code == 200 and listed.json()["keys"] == []
        status, part = hsm_part(server.url)
        assert status == 503
        assert part["code"] == "custody_unsupported"
        assert_says_what_to_check(part["message"], "CKM_EC_KEY_PAIR_GEN")
        assert server.stop() == 0
    assert restricted.objects() == []
    checked = config_check(home, restricted)
    assert checked["status"] == "unsupported" and checked["code"] == "custody_unsupported"
    assert_says_what_to_check(checked["message"], "CKM_EC_KEY_PAIR_GEN")
    assert USER_PIN not in (home / "serve.log").read_text()


def test_a_token_that_stopped_offering_ecdsa_refuses_signatures_with_a_503(
    restricted: RestrictedSoftHsm, home: Path
) -> None:
    """A key made while the token offered everything, then CKM_ECDSA taken away: SoftHSM2
    refuses C_SignInit with CKR_MECHANISM_INVALID. The signature is a 503 custody_unsupported
    (it was a 500 configuration error), /readyz says the same, and the key stays recorded and
    on the token."""
    with signd_serve(home, "--allow-blind-signing", environment=restricted.environment) as server:
        made = httpx.post(
            f"{server.url}/v1/keys",
            json={"chain": "ethereum", "custody": "hsm"},
            timeout=30,
            headers=AUTH,
        )
        assert made.status_code == 201, made.text
        key = made.json()["keys"][0]
        assert hsm_part(server.url)[0] == 200
    restricted.offer(f"CKM_EC_KEY_PAIR_GEN,{OFFERED}")
    with signd_serve(home, "--allow-blind-signing", environment=restricted.environment) as server:
        signed = httpx.post(
            f"{server.url}/v1/sign/hash",
            json={"key": key["key_id"], "hash": HASH},
            timeout=30,
            headers=AUTH,
        )
        assert signed.status_code == 503, signed.text
        error = signed.json()["error"]
        assert error["code"] == "custody_unsupported"
        assert_says_what_to_check(error["message"], "refused signing with MechanismInvalid")
        rpc = httpx.post(
            server.rpc_url,
            json={
                "jsonrpc": "2.0",
                "id": 1,
                "method": "eth_sign",
                "params": [key["address"], "0x42"],
            },
            timeout=30,
            headers=AUTH,
        ).json()
        assert rpc["error"]["code"] == -32006
        assert rpc["error"]["data"]["code"] == "custody_unsupported"
        status, part = hsm_part(server.url)
        assert status == 503 and part["code"] == "custody_unsupported"
        assert "CKM_ECDSA" in part["message"]
        shown = httpx.get(f"{server.url}/v1/keys/{key['key_id']}", timeout=30, headers=AUTH)
        assert shown.status_code == 200
    labels = restricted.objects()
    assert labels.count(f"signd-{key['key_id']}") == 2
