"""The auto-started local enclave process: started on use (gate-only when asked), replaced
when it hangs (and only then), and started again after a start that timed out."""

from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from signd.chains import address_deriver
from signd.config import load_settings
from signd.custody.enclave import EnclaveBackend
from signd.enclave.client import EnclaveClient
from signd.enclave.protocol import CUSTODY_ENCLAVE
from signd.enclave.transport import UnixTransport
from signd.errors import ConfigurationError, DependencyUnavailable
from signd.kms.server import start_kms_server
from signd.operations.backends import build_signer
from signd.operations.local_enclave import LocalEnclaveTransport
from tests.integration.support import (
    child_pids,
    core_file_limits,
    process_environment,
    record_children,
    wait_until,
)

pytestmark = pytest.mark.integration

HANG_TIMEOUT = 1.5


@pytest.fixture
def transports(tmp_path: Path) -> Iterator[list[LocalEnclaveTransport]]:
    """Transports a test makes (over a fresh home each); all stopped afterwards."""
    made: list[LocalEnclaveTransport] = []
    yield made
    for transport in made:
        pid = transport.pid
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        transport.stop()


def started(
    transports: list[LocalEnclaveTransport], home: Path, **options: Any
) -> tuple[LocalEnclaveTransport, int]:
    transport = LocalEnclaveTransport(home, **options)
    transports.append(transport)
    transport.connect(5.0).close()
    assert transport.pid is not None
    return transport, transport.pid


def answers(transport: LocalEnclaveTransport) -> bool:
    client = EnclaveClient(transport, timeout=5.0, connect_timeout=5.0)
    try:
        client.require_custody(CUSTODY_ENCLAVE)
        return True
    finally:
        client.close()


def state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_a_hung_enclave_is_killed_and_the_next_call_starts_another(
    transports: list[LocalEnclaveTransport], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    transport, first = started(transports, tmp_path / "home", hang_timeout=HANG_TIMEOUT)
    caplog.set_level(logging.ERROR, logger="signd.enclave.local")
    os.kill(first, signal.SIGSTOP)
    stopped = time.monotonic()
    wait_until(lambda: state(first) == "gone", timeout=10.0, what="the hung enclave killed")
    assert time.monotonic() - stopped >= HANG_TIMEOUT - 0.5  # not before it was silent that long
    # Gone from /proc once reaped; Popen notes the exit code a moment later, in the watchdog's
    # wait() (meanwhile its poll(), which pid uses, cannot take the wait lock and says "running").
    wait_until(lambda: transport.pid is None, timeout=5.0, what="the killed enclave noted")
    assert answers(transport)  # a new process, started on use
    assert transport.pid not in (None, first)
    [message] = [record.getMessage() for record in caplog.records]
    assert f"(pid {first}) has not answered for" in message


def test_an_enclave_that_answers_is_left_alone_even_while_it_is_busy(
    transports: list[LocalEnclaveTransport], tmp_path: Path
) -> None:
    transport, pid = started(transports, tmp_path / "home", hang_timeout=HANG_TIMEOUT)
    stop = threading.Event()

    def keep_it_busy() -> None:
        client = EnclaveClient(transport, timeout=5.0)
        try:
            while not stop.is_set():
                client.health()
        finally:
            client.close()

    busy = threading.Thread(target=keep_it_busy, daemon=True)
    busy.start()
    time.sleep(HANG_TIMEOUT * 3)
    stop.set()
    busy.join(10)
    assert transport.pid == pid
    assert state(pid) != "gone"


@contextmanager
def out_of_descriptors() -> Iterator[None]:
    """This process can open no new file descriptor until the block ends: its soft
    RLIMIT_NOFILE lowered to the lowest descriptor number not in use (a new descriptor takes
    the lowest free number, and must be below the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.open(os.devnull, os.O_RDONLY)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_running_out_of_descriptors_is_a_503_and_leaves_the_watchdog_running(
    transports: list[LocalEnclaveTransport], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A host out of file descriptors (a flood of idle connections can do that) cannot
    connect to its enclave: that is DependencyUnavailable, not a raw OSError (a 500), and the
    watchdog, which cannot ask the enclave either, neither dies nor takes it for hung."""
    transport, pid = started(transports, tmp_path / "home", hang_timeout=HANG_TIMEOUT)
    caplog.set_level(logging.WARNING, logger="signd.enclave.local")
    with out_of_descriptors():
        with pytest.raises(DependencyUnavailable, match="Too many open files"):
            EnclaveClient(transport, timeout=1.0, connect_timeout=1.0).require_custody(
                CUSTODY_ENCLAVE
            )
        time.sleep(HANG_TIMEOUT * 2.5)
    assert transport.pid == pid and state(pid) != "gone"  # the same enclave, not killed
    assert any("could not ask the local enclave" in r.getMessage() for r in caplog.records)
    os.kill(pid, signal.SIGSTOP)  # the watchdog still replaces an enclave that hangs
    wait_until(lambda: state(pid) == "gone", timeout=10.0, what="the hung enclave killed")


def test_hang_timeout_zero_never_replaces_it(
    transports: list[LocalEnclaveTransport], tmp_path: Path
) -> None:
    transport, pid = started(transports, tmp_path / "home", hang_timeout=0)
    os.kill(pid, signal.SIGSTOP)
    time.sleep(3.0)
    assert (transport.pid, state(pid)) == (pid, "T")
    os.kill(pid, signal.SIGCONT)
    assert answers(transport)
    assert transport.pid == pid


def test_the_enclave_ends_at_once_on_sigterm_right_after_it_started(
    transports: list[LocalEnclaveTransport], tmp_path: Path
) -> None:
    """A SIGTERM taken by another of its threads left the main thread asleep until stop()
    killed the process 10 s later (most runs, when it came right after the start)."""
    for attempt in range(3):
        transport, pid = started(transports, tmp_path / f"home-{attempt}", hang_timeout=0)
        began = time.monotonic()
        transport.stop()
        assert time.monotonic() - began < 5.0
        assert state(pid) == "gone"


def test_a_stopped_enclave_ends_at_once_when_signd_stops(
    transports: list[LocalEnclaveTransport], tmp_path: Path
) -> None:
    """SIGTERM to a SIGSTOPped child waits until it runs again: stop() continues it, rather
    than waiting out its 10 s before killing it."""
    transport, pid = started(transports, tmp_path / "home", hang_timeout=0)
    os.kill(pid, signal.SIGSTOP)
    began = time.monotonic()
    transport.stop()
    assert time.monotonic() - began < 5.0
    assert state(pid) == "gone"


def test_a_start_that_timed_out_leaves_the_next_start_working(
    transports: list[LocalEnclaveTransport], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    transport = LocalEnclaveTransport(tmp_path / "home", startup_timeout=0.01)
    transports.append(transport)
    with pytest.raises(DependencyUnavailable, match="did not start in time"):
        transport.connect(5.0)
    monkeypatch.setattr(transport, "_startup_timeout", 20.0)
    assert answers(transport)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("hang_timeout", "-1"),
        ("hang_timeout", '"soon"'),
        ("hang_timeout", "true"),
        ("timeout", "0"),
        ("timeout", '"ten"'),
        ("timeout", "-3"),
    ],
)
def test_bad_enclave_timeouts_are_refused_with_their_name(
    tmp_path: Path, key: str, value: str
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "signd.toml").write_text(
        f'[custody]\nenabled = ["enclave"]\n\n[enclave]\n{key} = {value}\n'
    )
    signer = build_signer(load_settings(home))
    try:
        with pytest.raises(ConfigurationError, match=f"enclave.{key} must be"):
            signer.backend(CUSTODY_ENCLAVE)
    finally:
        signer.close()


def gate_only(transport: LocalEnclaveTransport) -> bool:
    client = EnclaveClient(transport, timeout=5.0, connect_timeout=5.0)
    try:
        return client.gate_only()
    finally:
        client.close()


@pytest.mark.parametrize("flag", [False, True])
def test_the_local_enclave_is_started_with_the_transports_gate_only(
    transports: list[LocalEnclaveTransport], tmp_path: Path, flag: bool
) -> None:
    """Explicitly, whatever the enclave's configuration would choose by itself."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "signd.toml").write_text(f"[enclave]\ngate_only = {str(not flag).lower()}\n")
    transport, _ = started(transports, home, gate_only=flag)
    assert gate_only(transport) is flag


@pytest.mark.parametrize(("config", "expected"), [("", False), ("gate_only = true\n", True)])
def test_the_operators_local_enclave_is_gate_only_when_configured(
    tmp_path: Path, config: str, expected: bool
) -> None:
    """``signd keys new`` and friends send bare requests, so their local enclave allows them
    unless ``[enclave] gate_only = true`` says otherwise."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "signd.toml").write_text(f'[custody]\nenabled = ["enclave"]\n\n[enclave]\n{config}')
    with build_signer(load_settings(home)) as signer:
        backend = signer.backend(CUSTODY_ENCLAVE)
        assert isinstance(backend, EnclaveBackend)
        assert backend.client.gate_only() is expected


def test_a_bad_gate_only_setting_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "signd.toml").write_text(
        '[custody]\nenabled = ["enclave"]\n\n[enclave]\ngate_only = "yes"\n'
    )
    signer = build_signer(load_settings(home))
    try:
        with pytest.raises(ConfigurationError, match=r"enclave\.gate_only must be true or false"):
            signer.backend(CUSTODY_ENCLAVE)
    finally:
        signer.close()


@pytest.mark.parametrize(
    ("options", "config", "expected"),
    [
        ((), "", True),
        (("--allow-bare",), "", False),
        ((), "[enclave]\ngate_only = false\n", False),
        (("--gate-only",), "[enclave]\ngate_only = false\n", True),
    ],
)
def test_signd_enclave_is_gate_only_unless_told_otherwise(
    tmp_path: Path, options: tuple[str, ...], config: str, expected: bool
) -> None:
    """Run on its own (as on Nitro), ``signd enclave`` signs only through its gate; the
    operator's tools ask for bare requests with ``--allow-bare`` (or the configuration)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "signd.toml").write_text(config)
    socket_path = tmp_path / "enclave.sock"
    command = [sys.executable, "-m", "signd", "--home", str(home), "enclave"]
    command += ["--listen", f"unix://{socket_path}", *options]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = EnclaveClient(UnixTransport(str(socket_path)), timeout=5.0, connect_timeout=1.0)
    try:
        wait_until(lambda: socket_path.exists(), timeout=30.0, what="signd enclave to listen")
        wait_until(lambda: _answers_hello(client), timeout=30.0, what="signd enclave's HELLO")
        assert client.gate_only() is expected
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=15)


def _answers_hello(client: EnclaveClient) -> bool:
    try:
        client.gate_only()
        return True
    except DependencyUnavailable:
        return False


HSM_ON_THE_HOST = '[hsm]\nmodule = "/nonexistent/libpkcs11.so"\ntoken_label = "signd"\n'


@pytest.mark.parametrize(
    ("config", "pin_passed"),
    [
        ("", False),
        (HSM_ON_THE_HOST, False),
        (HSM_ON_THE_HOST + "in_enclave = true\n", True),
    ],
    ids=["no-hsm", "hsm-on-the-host", "hsm-in-the-enclave"],
)
def test_the_enclave_process_gets_the_hsm_pin_only_when_it_holds_the_hsm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: str, pin_passed: bool
) -> None:
    """The keystore is the host's: its passphrase stays out of the enclave's environment
    (readable in /proc). So does the HSM PIN, unless the enclave holds HSM custody
    (``[hsm] in_enclave``) and needs it. The rest of the environment is passed on."""
    monkeypatch.setenv("SIGND_KEYSTORE_PASSPHRASE", "canary passphrase for the host")
    monkeypatch.setenv("SIGND_HSM_PIN", "canary pin")
    home = tmp_path / "home"
    home.mkdir()
    (home / "signd.toml").write_text(f'[custody]\nenabled = ["enclave"]\n\n{config}')
    children = record_children(monkeypatch)
    with build_signer(load_settings(home)) as signer:
        signer.backend(CUSTODY_ENCLAVE).check_health()
    [environment] = [child.environment for child in children if "enclave" in child.command]
    assert "SIGND_KEYSTORE_PASSPHRASE" not in environment
    assert environment.get("SIGND_HSM_PIN") == ("canary pin" if pin_passed else None)
    assert environment["PATH"] == os.environ["PATH"]


def test_the_enclave_process_writes_no_core_file(
    transports: list[LocalEnclaveTransport], tmp_path: Path
) -> None:
    """Its cache holds unsealed private keys. Both limits are 0: a soft limit of 0 alone (which
    the test process may already have) could be raised again."""
    _, pid = started(transports, tmp_path / "home")
    assert core_file_limits(pid) == ["0", "0"]


def enclave_process(home: Path) -> int:
    """The pid of this process's local enclave child serving ``home``."""
    found = child_pids(os.getpid(), containing=("enclave", str(home)))
    if not found:
        raise AssertionError(f"no local enclave process for {home}")
    return found[0]


@pytest.mark.parametrize(
    ("hsm", "passed"),
    [
        (HSM_ON_THE_HOST + 'pin = "env:SIGND_TEST_OTHER_PIN"\n', False),
        (
            HSM_ON_THE_HOST + 'pin = {provider = "env", name = "SIGND_TEST_OTHER_PIN"}\n',
            False,
        ),
        (HSM_ON_THE_HOST + 'pin = "env:SIGND_TEST_OTHER_PIN"\nin_enclave = true\n', True),
    ],
    ids=["hsm-on-the-host", "hsm-on-the-host-table-reference", "hsm-in-the-enclave"],
)
def test_a_secret_the_config_names_reaches_the_enclave_only_when_it_uses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hsm: str, passed: bool
) -> None:
    """``[hsm] pin = "env:SIGND_TEST_OTHER_PIN"`` puts the PIN in a variable of the operator's
    choosing: the enclave process must not inherit it unless it holds the HSM, any more than
    SIGND_HSM_PIN. Read from the running process's /proc/<pid>/environ."""
    monkeypatch.setenv("SIGND_TEST_OTHER_PIN", "canary pin in another variable")
    home = tmp_path / "home"
    home.mkdir()
    (home / "signd.toml").write_text(f'[custody]\nenabled = ["enclave"]\n\n{hsm}')
    children = record_children(monkeypatch)
    with build_signer(load_settings(home)) as signer:
        signer.backend(CUSTODY_ENCLAVE).check_health()
        environment = process_environment(enclave_process(home))
    if environment is not None:
        assert environment.get("SIGND_TEST_OTHER_PIN") == (
            "canary pin in another variable" if passed else None
        )
        assert "SIGND_KEYSTORE_PASSPHRASE" not in environment
    [recorded] = [child.environment for child in children if "enclave" in child.command]
    assert ("SIGND_TEST_OTHER_PIN" in recorded) is passed
    if environment is None:
        pytest.skip("checked as started only: the running enclave's environ needs root")


UNRELATED_SECRETS = {
    "WALLET_BACKUP_PASSPHRASE": "canary passphrase of something else",
    "DATABASE_URL": "postgresql://signd:canary-password@db/signd",
    "SIGND_IMPORT_PASSWORD": "canary import password",
    "SIGND_KMS_SECRET_ACCESS_KEY": "canary secret key in a settings-like name",
    "AWS_SECRET_ACCESS_KEY": "canary AWS secret key the enclave does not use",
    "HTTPS_PROXY": "http://canary:proxy-password@proxy.example:3128",
    "GITHUB_TOKEN": "canary token",
}


def running_enclave_environment(home: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Start the local enclave for ``home`` through the signer, as ``signd serve`` does, and
    read the running process's environment (as root; as it was started otherwise)."""
    children = record_children(monkeypatch)
    with build_signer(load_settings(home)) as signer:
        signer.backend(CUSTODY_ENCLAVE).check_health()
        environment = process_environment(enclave_process(home))
    [recorded] = [child.environment for child in children if "enclave" in child.command]
    return environment if environment is not None else recorded


def test_the_enclave_gets_only_the_environment_it_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The enclave is the trusted computing base: a secret of the host's that it does not
    read, whatever its variable's name, stays out of its /proc/<pid>/environ. It gets the
    interpreter's variables, the locale, TZ, TMPDIR and the overrides of its own tables."""
    for name, value in {**UNRELATED_SECRETS, "SIGND_HSM_PIN": "canary pin"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LC_TIME", "C.UTF-8")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("SIGND_ENCLAVE_CACHE_MAX_USES", "7")
    monkeypatch.setenv("SIGND_METADATA_PATH", str(tmp_path / "canary-host-only-metadata.db"))
    home = tmp_path / "home"
    home.mkdir()
    (home / "signd.toml").write_text(f'[custody]\nenabled = ["enclave"]\n\n{HSM_ON_THE_HOST}')
    environment = running_enclave_environment(home, monkeypatch)
    assert not [name for name in environment if "canary" in environment[name]], sorted(environment)
    assert {
        name for name in environment if not name.startswith(("LC_", "PYTHON", "SIGND_ENCLAVE_"))
    } <= {"PATH", "HOME", "LANG", "TZ", "TMPDIR", "LD_LIBRARY_PATH"}, sorted(environment)
    assert environment["PATH"] == os.environ["PATH"]
    assert environment["LC_TIME"] == "C.UTF-8" and environment["TMPDIR"] == str(tmp_path)
    assert environment.get("PYTHONPATH") == os.environ.get("PYTHONPATH")
    assert environment["SIGND_ENCLAVE_CACHE_MAX_USES"] == "7"


def test_a_setting_the_host_has_by_environment_reaches_the_enclave(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``SIGND_BLOBS_PATH`` is read by the enclave, which writes the sealed keys: a key made
    through it lands there, and signs."""
    blobs = tmp_path / "elsewhere"
    monkeypatch.setenv("SIGND_BLOBS_PATH", str(blobs))
    home = tmp_path / "home"
    home.mkdir()
    (home / "signd.toml").write_text('[custody]\nenabled = ["enclave"]\n')
    with build_signer(load_settings(home)) as signer:
        backend = signer.backend(CUSTODY_ENCLAVE)
        (key,) = backend.create_keys("ethereum", address_deriver("ethereum"))
        digest = os.urandom(32)
        assert backend.sign_digest(key, digest).recover_public_key(digest) == key.public_key
    assert [path for path in blobs.rglob("*") if path.is_file()], "no blob where it was told"
    assert not (home / "blobs").exists()


def test_a_kms_custody_override_of_the_host_stays_out_of_the_enclave(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``SIGND_KMS_CUSTODY_*`` configures the host's KMS-key custody. Read as ``[kms]`` too
    (its name starts with ``SIGND_KMS_``), it made the enclave's embedded KMS an unknown
    ``[kms] custody_region`` and the enclave exit at start; it is not the enclave's."""
    monkeypatch.setenv("SIGND_KMS_CUSTODY_REGION", "eu-west-1")
    home = tmp_path / "home"
    home.mkdir()
    (home / "signd.toml").write_text('[custody]\nenabled = ["enclave"]\n')
    environment = running_enclave_environment(home, monkeypatch)
    assert "SIGND_KMS_CUSTODY_REGION" not in environment


def test_aws_credentials_reach_an_enclave_whose_kms_is_aws(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``[kms] type = "aws"`` with boto3's default credential chain: the enclave needs
    ``AWS_*`` (and boto3's proxy variables) from the host, and gets them. Against a
    kms-server that refuses any other credentials."""
    server = start_kms_server(tmp_path / "kms")
    try:
        info = server.info
        client = info.client()
        key_id = client.create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")[
            "KeyMetadata"
        ]["KeyId"]
        client.close()
        for name, value in {
            "AWS_ACCESS_KEY_ID": info.access_key_id,
            "AWS_SECRET_ACCESS_KEY": info.secret_access_key.reveal(),
            "AWS_DEFAULT_REGION": info.region,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "NO_PROXY": "127.0.0.1,localhost",
            "SIGND_KMS_TYPE": "aws",
            "SIGND_KMS_KEY_ID": key_id,
        }.items():
            monkeypatch.setenv(name, value)
        home = tmp_path / "home"
        home.mkdir()
        (home / "signd.toml").write_text(
            f'[custody]\nenabled = ["enclave"]\n\n[kms]\nendpoint_url = "{info.endpoint}"\n\n'
            '[enclave]\nattestation = "off"\n'
        )
        with build_signer(load_settings(home)) as signer:
            backend = signer.backend(CUSTODY_ENCLAVE)
            (key,) = backend.create_keys("ethereum", address_deriver("ethereum"))
            digest = os.urandom(32)
            assert backend.sign_digest(key, digest).recover_public_key(digest) == key.public_key
            environment = process_environment(enclave_process(home))
    finally:
        server.stop()
    if environment is not None:
        assert environment["AWS_ACCESS_KEY_ID"] == info.access_key_id
        assert environment["NO_PROXY"] == "127.0.0.1,localhost"


def test_a_variable_the_config_passes_reaches_the_enclave(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``[enclave] pass_environment``: for what a vendor's PKCS#11 module reads. A secret the
    enclave does not use stays out even when listed."""
    monkeypatch.setenv("VENDOR_HSM_CONFIG", "/etc/vendor/hsm.conf")
    monkeypatch.setenv("SIGND_KEYSTORE_PASSPHRASE", "canary passphrase for the host")
    home = tmp_path / "home"
    home.mkdir()
    (home / "signd.toml").write_text(
        '[custody]\nenabled = ["enclave"]\n\n'
        '[enclave]\npass_environment = ["VENDOR_HSM_CONFIG", "SIGND_KEYSTORE_PASSPHRASE"]\n'
    )
    environment = running_enclave_environment(home, monkeypatch)
    assert environment["VENDOR_HSM_CONFIG"] == "/etc/vendor/hsm.conf"
    assert "SIGND_KEYSTORE_PASSPHRASE" not in environment


@pytest.mark.parametrize("value", ['"VENDOR_HSM_CONFIG"', "[1]", '[""]'])
def test_a_malformed_pass_environment_is_a_configuration_error(tmp_path: Path, value: str) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "signd.toml").write_text(
        f'[custody]\nenabled = ["enclave"]\n\n[enclave]\npass_environment = {value}\n'
    )
    with pytest.raises(ConfigurationError) as raised:
        build_signer(load_settings(home)).backend(CUSTODY_ENCLAVE)
    assert raised.value.field == "enclave.pass_environment"
