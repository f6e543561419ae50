"""End to end with attestation on: the CLI, a real ``signd enclave`` process, the embedded
kms-server it starts, and KMS's ``Recipient`` flow.

- keys are created and signed (cold: every CLI command starts a fresh enclave process) with no
  ``[kms]`` configured, and the kms-server key pins the PCR0 of the code the enclave runs;
- the enclave runs from a copy of the ``signd`` package (``PYTHONPATH``), so changing one file
  of that copy changes the PCR0 its simulated NSM measures: KMS then refuses its data keys
  (existing keys cannot be unsealed, new ones cannot be created) until the file is restored;
- after a deliberate upgrade (the same file change), ``signd kms repin`` moves the pin to the new
  code, which then signs with the old keys, and the old code is locked out until re-pinned back;
- a compromised host (a proxy between the enclave and kms-server) that forges KMS answers with
  a data key it knows gets no address and no signature out of the enclave.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import signd
from signd.attestation.measurement import measure_code
from signd.cli.context import state
from signd.cli.main import app
from signd.kms.server import ServerInfo, start_kms_server
from signd.operations.local_kms import ATTESTED_ALIAS
from signd.storage.blobs import MARKER
from tests.integration.kms_proxy import ForgingKmsProxy

PASSPHRASE = "correct horse battery staple for tests"
DIGEST = "0x" + "5a" * 32
PACKAGE = Path(signd.__file__).resolve().parent


@dataclass
class Cli:
    home: Path
    runner: CliRunner

    def run(self, *args: str, ok: bool = True) -> dict[str, Any]:
        state.close()
        result = self.runner.invoke(app, ["--home", str(self.home), *args, "--json"])
        state.close()
        assert result.exit_code == (0 if ok else 1), result.output
        answer: dict[str, Any] = json.loads(result.stdout)
        return answer

    def new_key(self, ok: bool = True) -> dict[str, Any]:
        return self.run("keys", "new", "--custody", "enclave", ok=ok)

    def sign(self, key_id: str, ok: bool = True) -> dict[str, Any]:
        return self.run("sign", "hash", "--key", key_id, DIGEST, ok=ok)

    def blobs(self) -> list[Path]:
        return [
            path
            for path in (self.home / "blobs").rglob("*")
            if path.is_file() and path.name != MARKER
        ]


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    home = tmp_path / "home"
    home.mkdir()
    (home / "signd.toml").write_text("[keystore]\nscrypt_n = 1024\n")
    monkeypatch.setenv("SIGND_KEYSTORE_PASSPHRASE", PASSPHRASE)
    monkeypatch.delenv("SIGND_HOME", raising=False)
    yield Cli(home, CliRunner())
    state.close()


@pytest.fixture
def enclave_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the signd package that every child process (enclave, kms-server) imports."""
    root = tmp_path / "code"
    shutil.copytree(PACKAGE, root / "signd", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    )
    return root / "signd"


def pinned_pcr0(home: Path) -> str:
    """The PCR0 the embedded KMS key's policy pins (read through a kms-server of our own)."""
    with start_kms_server(home) as server:
        client = server.client()
        policy = json.loads(
            client.get_key_policy(KeyId=ATTESTED_ALIAS, PolicyName="default")["Policy"]
        )
    (home / "kms-server.json").unlink()
    values = {
        value
        for statement in policy["Statement"]
        for condition in statement.get("Condition", {}).values()
        for key, value in condition.items()
        if key == "kms:RecipientAttestation:PCR0"
    }
    assert len(values) == 1
    return str(values.pop())


def test_a_pcr0_change_locks_the_keys_until_the_code_is_restored(
    cli: Cli, enclave_code: Path
) -> None:
    key = cli.new_key()["keys"][0]
    before = cli.sign(key["key_id"])
    assert pinned_pcr0(cli.home) == measure_code(enclave_code).hex()
    assert not list(cli.home.glob("kms/*.key")), "the local stand-in KMS must not be used"

    signer = enclave_code / "enclave" / "signer.py"
    original = signer.read_bytes()
    signer.write_bytes(original + b"\n# one more line in the enclave code\n")
    assert pinned_pcr0(cli.home) != measure_code(enclave_code).hex()

    refused = cli.sign(key["key_id"], ok=False)["error"]
    assert refused["code"] == "access_denied"
    assert "KMS refused Decrypt (AccessDeniedException)" in refused["message"]
    blobs = cli.blobs()
    refused = cli.new_key(ok=False)["error"]
    assert refused["code"] == "access_denied"
    assert "GenerateDataKey" in refused["message"]
    assert cli.blobs() == blobs

    signer.write_bytes(original)
    assert cli.sign(key["key_id"]) == before
    assert cli.new_key()["keys"][0]["address"] != key["address"]


def test_repin_after_an_upgrade_lets_the_new_code_unseal_the_old_keys(
    cli: Cli, enclave_code: Path
) -> None:
    key = cli.new_key()["keys"][0]
    before = cli.sign(key["key_id"])
    original_pcr0 = measure_code(enclave_code).hex()

    signer = enclave_code / "enclave" / "signer.py"
    original = signer.read_bytes()
    signer.write_bytes(original + b"\n# the upgrade\n")
    upgraded_pcr0 = measure_code(enclave_code).hex()
    refused = cli.sign(key["key_id"], ok=False)["error"]
    assert refused["code"] == "access_denied"
    assert "signd kms repin" in refused["message"]
    assert "PCRs" in refused["message"]

    no_tty = cli.run("kms", "repin", "--pcr0", upgraded_pcr0, ok=False)["error"]
    assert "--yes" in no_tty["message"]
    assert pinned_pcr0(cli.home) == original_pcr0

    # the upgraded signd itself runs the command and measures its own code (PYTHONPATH)
    repinned = subprocess.run(
        [sys.executable, "-m", "signd", "--home", str(cli.home), "kms", "repin", "--yes", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert repinned.returncode == 0, repinned.stderr
    answer = json.loads(repinned.stdout)
    assert (answer["old_pcr0"], answer["new_pcr0"]) == ([original_pcr0], upgraded_pcr0)
    assert answer["changed"]
    assert original_pcr0 in repinned.stderr
    assert upgraded_pcr0 in repinned.stderr
    assert pinned_pcr0(cli.home) == upgraded_pcr0
    assert cli.sign(key["key_id"]) == before

    signer.write_bytes(original)
    assert cli.sign(key["key_id"], ok=False)["error"]["code"] == "access_denied"
    back = cli.run("kms", "repin", "--yes", "--pcr0", original_pcr0)
    assert (back["old_pcr0"], back["new_pcr0"]) == ([upgraded_pcr0], original_pcr0)
    assert cli.sign(key["key_id"]) == before
    assert not cli.run("kms", "repin", "--yes", "--pcr0", original_pcr0)["changed"]


@pytest.fixture
def proxy(cli: Cli) -> Iterator[ForgingKmsProxy]:
    """A real kms-server behind a forging proxy; kms-server.json points the enclave at the proxy."""
    with start_kms_server(cli.home) as server:
        forger = ForgingKmsProxy(server.endpoint)
        info = ServerInfo.read(cli.home)
        recorded = ServerInfo(
            forger.endpoint, info.region, info.access_key_id, info.secret_access_key
        )
        (cli.home / "kms-server.json").write_text(recorded.to_json())
        try:
            yield forger
        finally:
            forger.close()


@pytest.mark.parametrize("forge", ["plaintext", "recipient-own-blob", "recipient-real-blob"])
def test_a_host_that_forges_generate_data_key_gets_no_address(
    cli: Cli, proxy: ForgingKmsProxy, forge: str
) -> None:
    proxy.forge = forge
    refused = cli.new_key(ok=False)["error"]
    assert refused["code"] == "integrity_error"
    assert proxy.forged_keys, "the proxy never got to forge an answer"
    assert "GenerateDataKey" in proxy.operations
    assert cli.blobs() == []
    assert cli.run("keys", "list", "--custody", "enclave")["keys"] == []

    proxy.forge = None
    relayed = proxy.recipient_requests
    created = cli.new_key()["keys"][0]
    assert created["address"].startswith("0x")
    assert proxy.recipient_requests == relayed + 2, "GenerateDataKey and Decrypt, each attested"


def test_a_plaintext_in_a_decrypt_answer_is_refused(cli: Cli, proxy: ForgingKmsProxy) -> None:
    key = cli.new_key()["keys"][0]
    proxy.forge = "decrypt-plaintext"
    refused = cli.sign(key["key_id"], ok=False)["error"]
    assert refused["code"] == "integrity_error"
    assert proxy.forged_keys
    proxy.forge = None
    assert cli.sign(key["key_id"])["signature"]
