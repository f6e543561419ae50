"""A token that fails calls while it still answers: 503 naming the error, sessions kept.

Three real SoftHSM2 faults: the token folder replaced by a copy under the running module (what
a restore or a remount looks like), the folder made read-only (``chattr +i``), and a token
whose storage cannot keep new objects (a file size limit) on the first key of a process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pkcs11 import Attribute, KeyType, Mechanism
from pkcs11 import exceptions as p11

from signd.custody.hsm import HsmBackend
from signd.custody.hsm.library import Pkcs11Library
from signd.custody.hsm.pool import PooledSession, TokenFailed
from signd.custody.hsm.token import SECP256K1_EC_PARAMS, HsmToken
from signd.errors import DependencyUnavailable
from signd.storage.sqlite import SqliteMetadataStore
from tests.custody.hsm.conftest import USER_PIN, SoftHsm, eth_address
from tests.custody.hsm.load import run_under_load


def test_creating_keys_while_the_token_folder_is_replaced_is_unavailable_never_a_500(
    softhsm: SoftHsm, tmp_path: Path
) -> None:
    """Four threads create keys while the token folder is swapped for a copy of itself, again
    and again. SoftHSM2 then fails key generations with CKR_GENERAL_ERROR, and also with
    CKR_TEMPLATE_INCONSISTENT or CKR_ATTRIBUTE_VALUE_INVALID for the very template it accepts a
    moment later: the object it had just made vanished from the folder it indexes. Each create
    must answer DependencyUnavailable (503), never a configuration error (500), and signd must
    create and sign again once the folder stays."""
    label = "signd-swapped"
    softhsm.init_token(label)
    folder = softhsm.token_dir(label)

    def swap_the_folder_again_and_again(say: Callable[[str], None]) -> None:
        time.sleep(0.3)
        say("swapping")
        deadline = time.monotonic() + 4
        swaps = 0
        while time.monotonic() < deadline:
            copy, old = tmp_path / "copy", tmp_path / f"old-{swaps}"
            subprocess.run(["cp", "-a", str(folder), str(copy)], capture_output=True, check=False)
            os.rename(folder, old)
            os.rename(copy, folder)
            swaps += 1
            time.sleep(0.01)

    run = run_under_load(
        softhsm,
        label,
        tmp_path / "m.db",
        creators=4,
        signers=0,
        fault=swap_the_folder_again_and_again,
    )
    assert run.returncode == 0, f"exit status {run.returncode}: {run.stderr[-2000:]}"
    counts = run.counts
    during = {name: n for name, n in counts.items() if name.startswith("swapping")}
    assert during.get("swapping create dependency_unavailable", 0) > 0, counts
    assert set(during) <= {
        "swapping create ok",
        "swapping create dependency_unavailable",
    }, counts


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """The token folder and its files immutable (``chattr +i``): every write fails."""
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("making the token read-only needs chattr as root")
    paths = [str(path) for path in (folder, *folder.iterdir())]
    subprocess.run(["chattr", "+i", *paths], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *paths], check=True, capture_output=True)


def test_a_generation_the_read_only_token_fails_keeps_the_sessions_and_the_module(
    softhsm: SoftHsm, metadata: SqliteMetadataStore
) -> None:
    """C_GenerateKeyPair fails with CKR_GENERAL_ERROR on a read-only token that still answers
    C_GetTokenInfo. That is a 503 naming the error, and no reason to drop the sessions or to
    re-initialise the module: both end every other thread's calls, and logging in again on the
    read-only token makes SoftHSM2 mark it invalid until the module is re-initialised."""
    label = "signd-read-only-once"
    softhsm.init_token(label)
    library = Pkcs11Library.load(softhsm.module)
    library.reinitialize(library.generation)  # a loaded SoftHSM2 sees new tokens only then
    backend = HsmBackend(softhsm.settings(label, pool_size=2, reconnect_interval=0), metadata)
    try:
        (key,) = backend.create_keys("ethereum", eth_address)
        generation = library.generation
        with read_only(softhsm.token_dir(label)):
            errors = []
            for _ in range(3):
                with pytest.raises(DependencyUnavailable) as raised:
                    backend.create_keys("ethereum", eth_address)
                errors.append(raised.value)
            assert library.generation == generation, "the module was re-initialised"
            for error in errors:
                assert error.http_status == 503
                assert "(GeneralError); it still answers" in str(error)
                assert "try again" not in str(error)  # it will fail until the operator acts
                assert "storage (full or read-only)" in str(error)
                assert "that its module makes secp256k1 keys" in str(error)
                assert USER_PIN not in str(error)
            digest = os.urandom(32)
            assert backend.sign_digest(key, digest).recover_public_key(digest) == key.public_key
        (fresh,) = backend.create_keys("ethereum", eth_address)
        digest = os.urandom(32)
        assert backend.sign_digest(fresh, digest).recover_public_key(digest) == fresh.public_key
        assert library.generation == generation, "the module was re-initialised"
    finally:
        backend.close()


def generate_with_a_wrong_key_type(pooled: PooledSession, cka_id: bytes, label: str) -> bytes:
    """signd's template with a bug: an RSA key type for an EC key pair."""
    pooled.session.generate_keypair(
        KeyType.EC,
        mechanism=Mechanism.EC_KEY_PAIR_GEN,
        id=cka_id,
        label=label,
        store=True,
        public_template={Attribute.EC_PARAMS: SECP256K1_EC_PARAMS, Attribute.TOKEN: True},
        private_template={Attribute.TOKEN: True, Attribute.KEY_TYPE: KeyType.RSA},
    )
    raise AssertionError("SoftHSM2 accepted an RSA key type for an EC key pair")


def test_a_template_the_token_refuses_is_unavailable_before_and_after_it_worked(
    backend: HsmBackend, softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CKR_TEMPLATE_INCONSISTENT is a 503 naming the error whether or not the token generated
    a key from signd's template in this process before: no caller chooses that template, and
    a token that refuses it cannot be told from a module without secp256k1 or a token in a bad
    state. Neither touches the module."""
    library = Pkcs11Library.load(softhsm.module)
    generation = library.generation
    monkeypatch.setattr(HsmToken, "_generate", staticmethod(generate_with_a_wrong_key_type))
    with pytest.raises(DependencyUnavailable, match="TemplateInconsistent") as first:
        backend.create_keys("ethereum", eth_address)
    assert first.value.http_status == 503
    assert "refused signd's secp256k1 key template" in str(first.value)
    assert "try again" not in str(first.value)
    assert "Retrying will not help until" in str(first.value)
    monkeypatch.undo()
    backend.create_keys("ethereum", eth_address)
    monkeypatch.setattr(HsmToken, "_generate", staticmethod(generate_with_a_wrong_key_type))
    with pytest.raises(DependencyUnavailable, match="TemplateInconsistent"):
        backend.create_keys("ethereum", eth_address)
    assert library.generation == generation


def test_a_signature_the_token_fails_twice_says_what_to_check(
    backend: HsmBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device fault on both tries of a signature, the token still answering: a 503 naming
    the error that says a retry helps only with a passing fault, and what to look at if it
    recurs; the sessions are kept, and the next signature works."""
    (key,) = backend.create_keys("ethereum", eth_address)

    def device_error(self: PooledSession, cka_id: bytes, digest: bytes) -> bytes:
        raise p11.DeviceError()

    monkeypatch.setattr(PooledSession, "sign", device_error)
    with pytest.raises(TokenFailed) as failed:
        backend.sign_digest(key, bytes(32))
    message = str(failed.value)
    assert failed.value.http_status == 503 and failed.value.error is p11.DeviceError
    assert "failed while signing (DeviceError); it still answers" in message
    assert "try again" not in message
    assert "helps only if the fault was passing" in message and "HSM's own log" in message
    monkeypatch.undo()
    digest = os.urandom(32)
    assert backend.sign_digest(key, digest).recover_public_key(digest) == key.public_key


FIRST_CREATE_SCRIPT = """
import json, resource, signal, sys
from pathlib import Path
from signd.crypto.secret import Secret
from signd.custody.hsm import HsmSettings
from signd.custody.hsm.library import Pkcs11Library
from signd.custody.hsm.token import HsmToken
from signd.errors import SigndError

module, label, pin = sys.argv[1:4]
settings = HsmSettings(module_path=Path(module), token_label=label, pin=Secret(pin))
token = HsmToken(settings)
generation = Pkcs11Library.load(settings.module_path).generation
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4, resource.RLIM_INFINITY))
try:
    token.generate_key("refused")
    refused = {"code": "none"}
except SigndError as exc:
    refused = {"code": exc.code, "status": exc.http_status, "message": exc.message}
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
made = token.generate_key("after")
reinitialised = Pkcs11Library.load(settings.module_path).generation != generation
token.close()
print(json.dumps({"refused": refused, "made": made.label, "reinitialised": reinitialised}))
"""


def test_a_template_refused_on_the_first_create_after_a_start_is_unavailable_never_a_500(
    softhsm: SoftHsm,
) -> None:
    """The first key generation of a freshly started process, on a token whose storage
    cannot keep new objects (every write to the token folder past 4 bytes fails with EFBIG):
    SoftHSM2 then answers CKR_ATTRIBUTE_VALUE_INVALID for signd's fixed template, before the
    token ever accepted it in this process. The caller chose no template, so this is a 503
    saying the token refused signd's secp256k1 key template, without the PIN, and the next
    create works once the token can store objects again, with sessions and module kept.
    In a child process: the file size limit holds for a whole process."""
    label = "signd-first-create"
    softhsm.init_token(label)
    run = subprocess.run(
        [sys.executable, "-c", FIRST_CREATE_SCRIPT, str(softhsm.module), label, USER_PIN],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    outcome = json.loads(run.stdout)
    refused = outcome["refused"]
    assert refused["code"] == "dependency_unavailable", refused
    assert refused["status"] == 503
    assert "refused signd's secp256k1 key template" in refused["message"]
    assert "AttributeValueInvalid" in refused["message"]
    assert "does not support secp256k1" in refused["message"]
    assert "try again" not in refused["message"]
    assert "check the token's free space" in refused["message"]
    assert USER_PIN not in refused["message"] and USER_PIN not in run.stderr
    assert outcome["made"] == "signd-after"
    assert not outcome["reinitialised"]
