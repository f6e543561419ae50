"""`--custody kms` through the CLI and the custody registry, against a real `signd kms-server`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from signd.kms.server import start_kms_server
from tests.cli.conftest import Cli
from tests.cli.test_custody_tiers import check_signing


@pytest.fixture
def kms_cli(cli: Cli) -> Iterator[Cli]:
    server = start_kms_server(cli.home)  # writes $SIGND_HOME/kms-server.json
    config = cli.home / "signd.toml"
    config.write_text(config.read_text() + "\n[kms_custody]\nkms_server = true\n")
    try:
        yield cli
    finally:
        server.stop()


def test_kms_custody_creates_lists_and_signs_through_the_cli(kms_cli: Cli) -> None:
    keys = kms_cli.run("keys", "new", "--custody", "kms", "--count", "2", "--json")["keys"]
    assert {k["custody"] for k in keys} == {"kms"}
    for key in keys:
        check_signing(kms_cli, key)
    listed = kms_cli.run("keys", "list", "--custody", "kms", "--json")["keys"]
    assert [k["key_id"] for k in listed] == [k["key_id"] for k in keys]
    shown = kms_cli.run("keys", "show", keys[1]["address"].lower(), "--json")
    assert shown["key_id"] == keys[1]["key_id"]


def test_bad_kms_custody_settings_are_configuration_errors(cli: Cli) -> None:
    config = cli.home / "signd.toml"
    config.write_text(config.read_text() + '\n[kms_custody]\nread_timeout = "soon"\n')
    out = cli.run("keys", "new", "--custody", "kms", "--json", ok=False)
    assert out["error"]["code"] == "configuration_error"
    assert "read_timeout" in out["error"]["message"]
