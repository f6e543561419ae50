"""State at rest, the info file, restarts, the child-process and CLI forms, and no leaks."""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from signd.errors import ConfigurationError, IntegrityError
from signd.kms.server import (
    INFO_FILE,
    RunningServer,
    ServerInfo,
    start_kms_server,
    start_kms_server_process,
)
from signd.kms.server.store import KeyStore
from signd.operations.local_kms import LocalKmsServer
from tests.integration.support import (
    child_pids,
    core_file_limits,
    process_environment,
    record_children,
)
from tests.kms.server.conftest import error_code

pytestmark = pytest.mark.integration


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_info_file(server: RunningServer, home: Path) -> None:
    path = home / INFO_FILE
    assert mode(path) == 0o600
    document = json.loads(path.read_text())
    assert set(document) == {"endpoint", "region", "access_key_id", "secret_access_key"}
    assert document["endpoint"] == server.endpoint
    assert document["endpoint"].startswith("http://127.0.0.1:")
    info = ServerInfo.read(home)
    assert info.client().list_keys()["Keys"] == []


def test_state_is_private_and_survives_a_restart(home: Path) -> None:
    with start_kms_server(home) as first:
        kms = first.client()
        key_id = kms.create_key()["KeyMetadata"]["KeyId"]
        signing = kms.create_key(KeySpec="ECC_SECG_P256K1", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
        public = kms.get_public_key(KeyId=signing["KeyId"])["PublicKey"]
        data_key = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256")
        kms.disable_key(KeyId=signing["KeyId"])
        credentials = first.credentials
    state = home / "kms-server"
    assert mode(state) == 0o700
    files = [path for path in state.rglob("*") if path.is_file()]
    assert {path.name for path in files} >= {"kek", "credentials.json", f"{key_id}.json"}
    assert all(mode(path) == 0o600 for path in files)
    key_file = json.loads((state / "keys" / f"{key_id}.json").read_text())
    assert set(key_file) >= {"material", "policy", "key_spec"}
    assert len(base64.b64decode(key_file["material"])) == 12 + 32 + 16
    with start_kms_server(home) as second:
        assert second.credentials == credentials
        kms = second.client()
        assert (
            kms.decrypt(CiphertextBlob=data_key["CiphertextBlob"])["Plaintext"]
            == (data_key["Plaintext"])
        )
        assert kms.describe_key(KeyId=signing["KeyId"])["KeyMetadata"]["Enabled"] is False
        kms.enable_key(KeyId=signing["KeyId"])
        assert kms.get_public_key(KeyId=signing["KeyId"])["PublicKey"] == public


def test_swapped_or_tampered_material_is_detected(home: Path) -> None:
    with start_kms_server(home) as running:
        kms = running.client()
        first = kms.create_key()["KeyMetadata"]["KeyId"]
        second = kms.create_key()["KeyMetadata"]["KeyId"]
    keys = home / "kms-server" / "keys"
    one, two = (json.loads((keys / f"{k}.json").read_text()) for k in (first, second))
    one["material"], two["material"] = two["material"], one["material"]
    (keys / f"{first}.json").write_text(json.dumps(one))
    with pytest.raises(IntegrityError):
        KeyStore(home / "kms-server")


def test_a_readable_kek_is_refused(home: Path) -> None:
    KeyStore(home / "kms-server")
    os.chmod(home / "kms-server" / "kek", 0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        KeyStore(home / "kms-server")


def test_secrets_stay_out_of_logs_and_reprs(
    server: RunningServer, home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="signd")
    kms = server.client()
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    data_key = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256")["Plaintext"]
    with pytest.raises(ClientError):
        kms.decrypt(CiphertextBlob=b"SKS\x01" + b"0" * 100)
    secret = str(server.credentials[1].reveal())
    kek = (home / "kms-server" / "kek").read_bytes()
    assert any(record.name.startswith("signd.kms.server") for record in caplog.records)
    texts = [
        caplog.text,
        repr(server),
        repr(server.info),
        str(server.credentials),
        repr(KeyStore(home / "kms-server")),
        repr(KeyStore(home / "kms-server").get(key_id)),
    ]
    for text in texts:
        for needle in (secret, base64.b64encode(data_key).decode(), data_key.hex(), kek.hex()):
            assert needle not in text


def test_child_process_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGND_KEYSTORE_PASSPHRASE", "canary passphrase")
    monkeypatch.setenv("SIGND_HSM_PIN", "canary pin")
    children = record_children(monkeypatch)
    running = start_kms_server_process(tmp_path / "home")
    try:
        kms = running.client()
        key_id = kms.create_key()["KeyMetadata"]["KeyId"]
        assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Enabled"
        process = running._process
        assert process is not None and process.poll() is None
        [child] = children
        # it needs neither secret
        assert not [value for value in child.environment.values() if "canary" in value]
        # its key material stays out of core files
        assert core_file_limits(process.pid) == ["0", "0"]
    finally:
        running.stop()
    assert process.poll() is not None


SECRET_CANARIES = {
    "SIGND_KEYSTORE_PASSPHRASE": "canary keystore passphrase",
    "SIGND_HSM_PIN": "canary pin",
    "SIGND_TEST_OTHER_PIN": "canary pin that [hsm] pin = env:SIGND_TEST_OTHER_PIN names",
    "WALLET_BACKUP_PASSPHRASE": "canary passphrase of something else",
    "AWS_SECRET_ACCESS_KEY": "canary AWS secret key",
    "DATABASE_URL": "postgresql://signd:canary-password@db/signd",
}


def kms_server_process(home: Path) -> int:
    """The pid of this process's kms-server child serving ``home``."""
    found = child_pids(os.getpid(), containing=("signd.kms.server", str(home)))
    if not found:
        raise AssertionError(f"no kms-server process for {home}")
    return found[0]


def test_the_embedded_kms_server_gets_only_the_environment_it_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The embedded kms-server (what ``signd serve``'s enclave starts on first KMS use) reads
    no variable of signd's, nor AWS's: it gets the interpreter's own (PYTHON*), PATH, HOME,
    the locale, TZ, TMPDIR and LD_LIBRARY_PATH (an interpreter built with a shared libpython
    needs it to start), and nothing else, so no secret of the parent's, whatever its name,
    sits in its /proc/<pid>/environ. Read from the running process (as root; the environment
    it was started with otherwise)."""
    for name, value in SECRET_CANARIES.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LC_TIME", "C.UTF-8")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    libraries = f"{tmp_path}/lib:{os.environ.get('LD_LIBRARY_PATH', '')}".rstrip(":")
    monkeypatch.setenv("LD_LIBRARY_PATH", libraries)
    children = record_children(monkeypatch)
    home = tmp_path / "home"
    server = LocalKmsServer(home)
    try:
        server.ensure().client().create_key()  # it runs with what it was given
        try:
            environment = process_environment(kms_server_process(home))
        finally:
            [recorded] = [child.environment for child in children]
    finally:
        server.stop()
    for seen in (recorded, environment if environment is not None else recorded):
        assert not set(SECRET_CANARIES) & set(seen), sorted(seen)
        assert not [name for name in seen if "canary" in seen[name]], sorted(seen)
        assert {name for name in seen if not name.startswith(("LC_", "PYTHON"))} <= {
            "PATH",
            "HOME",
            "LANG",
            "TZ",
            "TMPDIR",
            "LD_LIBRARY_PATH",
        }, sorted(seen)
        assert seen["PATH"] == os.environ["PATH"]
        assert seen["LC_TIME"] == "C.UTF-8" and seen["TMPDIR"] == str(tmp_path)
        assert seen.get("LD_LIBRARY_PATH") == libraries
        assert seen.get("PYTHONPATH") == os.environ.get("PYTHONPATH")
    if environment is None:
        pytest.skip("checked as started only: the running kms-server's environ needs root")


def test_cli_kms_server(tmp_path: Path) -> None:
    home = tmp_path / "home"
    command = [
        sys.executable, "-c", "from signd.cli.kms import kms_app; kms_app()",
        "kms-server", "--home", str(home), "--port", "0",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (home / INFO_FILE).exists() and time.monotonic() < deadline:
            assert process.poll() is None
            time.sleep(0.05)
        info = ServerInfo.read(home)
        assert core_file_limits(process.pid) == ["0", "0"]
        kms = info.client()
        key_id = kms.create_key()["KeyMetadata"]["KeyId"]
        with pytest.raises(ClientError) as caught:
            kms.describe_key(KeyId=key_id.replace(key_id[0], "f" if key_id[0] != "f" else "e"))
        assert error_code(caught) == "NotFoundException"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.stderr is not None
    assert "listening on http://127.0.0.1:" in process.stderr.read().decode()


def test_port_in_use_is_a_configuration_error(server: RunningServer, tmp_path: Path) -> None:
    port = int(server.endpoint.rsplit(":", 1)[1])
    with pytest.raises(ConfigurationError, match="cannot listen"):
        start_kms_server(tmp_path / "other", port=port)


def test_stop_is_idempotent(tmp_path: Path) -> None:
    running = start_kms_server(tmp_path / "home")
    kms: Any = running.client()
    kms.list_keys()
    running.stop()
    running.stop()
    port = int(running.endpoint.rsplit(":", 1)[1])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_a_client_gone_before_its_answer_leaves_no_traceback(
    server: RunningServer, capfd: pytest.CaptureFixture[str]
) -> None:
    """A caller that times out closes its connection while the server works; the answer then
    meets a reset connection, which is no error of the server's (it printed a traceback to
    the enclave's log for each one)."""
    host, port = server.endpoint.removeprefix("http://").split(":")
    request = (
        f"POST / HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-amz-json-1.1\r\n"
        "X-Amz-Target: TrentService.ListKeys\r\nContent-Length: 2\r\n\r\n{}"
    ).encode()
    for _ in range(20):
        with socket.create_connection((host, int(port)), timeout=5) as connection:
            connection.sendall(request)
            connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
    time.sleep(0.5)  # the handler threads answer into the reset connections
    assert server.client().list_keys()["Keys"] == []  # still serving
    assert "Traceback" not in capfd.readouterr().err
