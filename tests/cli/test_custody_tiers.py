"""The same CLI commands over enclave custody: callers cannot tell the tiers apart."""

from __future__ import annotations

import json
import os
import subprocess

import coincurve
from eth_account import Account

from signd.storage.blobs import MARKER
from tests.cli.conftest import Cli
from tests.cli.test_cli import EIP1559_TX


def check_signing(cli: Cli, key: dict[str, str]) -> None:
    digest = os.urandom(32)
    first = cli.run("sign", "hash", "--key", key["address"], "0x" + digest.hex(), "--json")
    recovered = coincurve.PublicKey.from_signature_and_message(
        bytes.fromhex(first["signature"][2:]), digest, hasher=None
    )
    assert "0x" + recovered.format().hex() == key["public_key"]
    tx = cli.run("sign", "eth-tx", "--key", key["key_id"], "--json", input=json.dumps(EIP1559_TX))
    assert Account.recover_transaction(tx["raw_transaction"]) == key["address"] == tx["from"]


def test_enclave_custody_through_the_cli_survives_restarts(cli: Cli) -> None:
    keys = cli.run("keys", "new", "--custody", "enclave", "--count", "3", "--json")["keys"]
    assert {k["custody"] for k in keys} == {"enclave"}
    for key in keys:
        check_signing(cli, key)
    digest = "0x" + "ab" * 32
    # each invocation starts and stops its own enclave process: same key, same RFC 6979 signature
    one = cli.run("sign", "hash", "--key", keys[0]["key_id"], digest, "--json")
    two = cli.run("sign", "hash", "--key", keys[0]["key_id"], digest, "--json")
    assert one == two
    listed = cli.run("keys", "list", "--custody", "enclave", "--json")["keys"]
    assert [k["key_id"] for k in listed] == [k["key_id"] for k in keys]
    blobs = [p for p in (cli.home / "blobs").rglob("*") if p.is_file() and p.name != MARKER]
    # one durable write per batch: the three sealed keys share one blob, each its own range
    assert [p.name for p in blobs] == [keys[0]["details"]["blob"].split("@")[0]]
    assert len({k["details"]["blob"] for k in keys}) == 3


def test_enclave_ciphertext_never_holds_the_private_key(cli: Cli) -> None:
    (key,) = cli.run("keys", "new", "--custody", "enclave", "--json")["keys"]
    export = cli.run(
        "keys", "export", key["key_id"], "--unsafe-export-private-key", "--json", ok=False
    )
    assert export["error"]["code"] == "unsupported_operation"
    signature = cli.run("sign", "hash", "--key", key["key_id"], "0x" + "11" * 32, "--json")
    assert signature["recovery_id"] in (0, 1)


def test_no_enclave_process_outlives_the_command(cli: Cli) -> None:
    cli.run("keys", "new", "--custody", "enclave", "--json")
    found = subprocess.run(
        ["pgrep", "-f", f"signd --home {cli.home} enclave"], capture_output=True, text=True
    )
    assert found.stdout.strip() == ""
