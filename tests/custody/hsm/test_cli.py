"""HSM custody through the `signd` CLI (uses this folder's one SoftHSM2 session fixture)."""

from __future__ import annotations

import json

import pytest

from tests.cli.conftest import Cli, cli  # noqa: F401
from tests.cli.test_custody_tiers import check_signing
from tests.custody.hsm.conftest import MAIN_TOKEN, USER_PIN, SoftHsm
from tests.custody.hsm.test_backend import make_outside_key


@pytest.fixture
def hsm_cli(
    cli: Cli,  # noqa: F811
    softhsm: SoftHsm,
    monkeypatch: pytest.MonkeyPatch,
) -> Cli:
    monkeypatch.setenv("SIGND_HSM_MODULE", str(softhsm.module))
    monkeypatch.setenv("SIGND_HSM_TOKEN_LABEL", MAIN_TOKEN)
    monkeypatch.setenv("SIGND_HSM_PIN", USER_PIN)
    return cli


def test_hsm_custody_through_the_cli(hsm_cli: Cli) -> None:
    keys = hsm_cli.run("keys", "new", "--custody", "hsm", "--count", "2", "--json")["keys"]
    assert {k["custody"] for k in keys} == {"hsm"}
    for key in keys:
        check_signing(hsm_cli, key)
    shown = hsm_cli.run("keys", "show", keys[0]["address"].lower(), "--json")
    assert shown["key_id"] == keys[0]["key_id"]


def test_hsm_adoption_through_the_cli(hsm_cli: Cli, softhsm: SoftHsm) -> None:
    make_outside_key(softhsm, "made-outside")
    out = hsm_cli.run("keys", "import", "--custody", "hsm", "--label", "made-outside", "--json")
    (key,) = out["keys"]
    check_signing(hsm_cli, key)
    again = hsm_cli.run(
        "keys", "import", "--custody", "hsm", "--label", "made-outside", "--json", ok=False
    )
    assert again["error"]["code"] == "key_exists"


def test_wrong_hsm_pin_is_unavailable_without_the_pin(
    hsm_cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIGND_HSM_PIN", "99999999")
    out = hsm_cli.run("keys", "new", "--custody", "hsm", "--json", ok=False)
    assert out["error"]["code"] == "dependency_unavailable"
    assert "refused signd's PIN" in out["error"]["message"]
    assert "99999999" not in json.dumps(out)
