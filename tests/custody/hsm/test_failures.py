"""How HsmBackend fails and recovers: bad module, token or PIN; a token that goes away."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from signd.custody.hsm import HsmBackend
from signd.custody.hsm.library import PinRefused, Pkcs11Library
from signd.custody.hsm.token import HsmToken
from signd.errors import ConfigurationError, DependencyUnavailable, IntegrityError
from signd.storage.sqlite import SqliteMetadataStore
from tests.custody.hsm.conftest import (
    LOSS_TOKEN,
    MAIN_TOKEN,
    PIN_TOKEN,
    USER_PIN,
    WIPE_TOKEN,
    SoftHsm,
    eth_address,
)
from tests.custody.hsm.load import run_under_load


def test_wrong_pin_is_refused_as_unavailable_without_the_pin(
    softhsm: SoftHsm, metadata: SqliteMetadataStore, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "wrong-pin-" + os.urandom(4).hex()
    caplog.set_level(logging.DEBUG)
    with pytest.raises(PinRefused) as raised:
        HsmBackend(softhsm.settings(PIN_TOKEN, pin=wrong), metadata)
    assert "incorrect" in str(raised.value)
    assert raised.value.http_status == 503
    for text in (str(raised.value), repr(raised.value), str(raised.value.to_dict()), caplog.text):
        assert wrong not in text
    backend = HsmBackend(softhsm.settings(PIN_TOKEN), metadata)
    backend.check_health()
    assert USER_PIN not in repr(backend) and USER_PIN not in repr(softhsm.settings())
    backend.close()


def test_missing_module_is_a_configuration_error(
    tmp_path: Path, softhsm: SoftHsm, metadata: SqliteMetadataStore
) -> None:
    settings = softhsm.settings()
    with pytest.raises(ConfigurationError, match="does not exist"):
        HsmBackend(
            type(settings)(
                module_path=tmp_path / "nope.so", pin=settings.pin, token_label=MAIN_TOKEN
            ),
            metadata,
        )
    fake = tmp_path / "fake.so"
    fake.write_text("not a shared library")
    with pytest.raises(ConfigurationError, match="not a loadable PKCS#11 module"):
        HsmBackend(
            type(settings)(module_path=fake, pin=settings.pin, token_label=MAIN_TOKEN), metadata
        )


def test_a_shared_library_without_pkcs11_is_a_configuration_error(
    softhsm: SoftHsm, metadata: SqliteMetadataStore
) -> None:
    libz = next(
        (p for p in Path("/usr/lib/x86_64-linux-gnu").glob("libz.so*") if p.is_file()), None
    )
    if libz is None:
        pytest.skip("no libz to load")
    settings = softhsm.settings()
    with pytest.raises(ConfigurationError, match="not a loadable PKCS#11 module"):
        HsmBackend(
            type(settings)(module_path=libz, pin=settings.pin, token_label=MAIN_TOKEN), metadata
        )


def test_missing_token_label_is_a_configuration_error_naming_present_tokens(
    softhsm: SoftHsm, metadata: SqliteMetadataStore
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        HsmBackend(softhsm.settings("no-such-token"), metadata)
    message = str(raised.value)
    assert "'no-such-token'" in message
    assert repr(MAIN_TOKEN) in message
    assert USER_PIN not in message


def test_missing_slot_is_a_configuration_error(
    softhsm: SoftHsm, metadata: SqliteMetadataStore
) -> None:
    settings = softhsm.settings()
    with pytest.raises(ConfigurationError, match="slot 424242"):
        HsmBackend(
            type(settings)(module_path=settings.module_path, pin=settings.pin, slot=424242),
            metadata,
        )


def test_token_by_slot_id(softhsm: SoftHsm, metadata: SqliteMetadataStore) -> None:
    lib = Pkcs11Library.load(softhsm.module).lib
    slot_id = lib.get_token(token_label=MAIN_TOKEN).slot.slot_id
    settings = softhsm.settings()
    backend = HsmBackend(
        type(settings)(module_path=settings.module_path, pin=settings.pin, slot=slot_id), metadata
    )
    try:
        (key,) = backend.create_keys("ethereum", eth_address)
        assert backend.sign_digest(key, os.urandom(32)).recovery_id in (0, 1)
    finally:
        backend.close()


def assert_second_path_shares_the_module(
    softhsm: SoftHsm, metadata: SqliteMetadataStore, link: Path
) -> None:
    """A backend on ``link`` and one on SoftHSM2's own path share one loaded module: each
    signs with the keys the other made, and the first is healthy after the second closes."""
    settings = softhsm.settings(pool_size=1)
    first = HsmBackend(settings, metadata)
    try:
        second = HsmBackend(
            type(settings)(module_path=link, pin=settings.pin, token_label=MAIN_TOKEN),
            metadata,
        )
        try:
            assert Pkcs11Library.load(link) is Pkcs11Library.load(softhsm.module)
            (made_by_second,) = second.create_keys("ethereum", eth_address)
            (made_by_first,) = first.create_keys("ethereum", eth_address)
            digest = os.urandom(32)
            for backend in (first, second):
                for key in (made_by_first, made_by_second):
                    signature = backend.sign_digest(key, digest)
                    assert signature.recover_public_key(digest) == key.public_key
        finally:
            second.close()
        first.check_health()
    finally:
        first.close()


def test_a_symlink_to_the_loaded_module_shares_it(
    softhsm: SoftHsm, metadata: SqliteMetadataStore, tmp_path: Path
) -> None:
    """A second backend whose module path is a symlink to the module already loaded (an alias
    a distribution or a container image provides) uses that module: the dynamic loader hands
    out the same library for both paths, and initialising it a second time would fail."""
    link = tmp_path / "alias" / "libpkcs11.so"
    link.parent.mkdir()
    link.symlink_to(softhsm.module)
    assert_second_path_shares_the_module(softhsm, metadata, link)


def test_a_hard_link_to_the_loaded_module_shares_it(
    softhsm: SoftHsm, metadata: SqliteMetadataStore, tmp_path: Path
) -> None:
    """A second backend whose module path is a hard link to the module already loaded (same
    device and inode, no symbolic link to resolve) uses that module: the dynamic loader knows
    the file by its identity and hands out the same library, and initialising it a second
    time would fail."""
    module = softhsm.module.resolve()
    link = tmp_path / "hard" / "libpkcs11.so"
    link.parent.mkdir()
    try:
        os.link(module, link)
    except OSError as exc:  # another filesystem (EXDEV), or protected_hardlinks (EPERM)
        pytest.skip(f"cannot hard-link {module} into {tmp_path}: {exc.strerror}")
    assert (link.stat().st_dev, link.stat().st_ino) == (module.stat().st_dev, module.stat().st_ino)
    assert_second_path_shares_the_module(softhsm, metadata, link)


# python-pkcs11 finalises the search it could not start and reports that from a __del__.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_module_reinitialised_under_the_backend_recovers_transparently(
    backend: HsmBackend, softhsm: SoftHsm
) -> None:
    (key,) = backend.create_keys("ethereum", eth_address)
    library = Pkcs11Library.load(softhsm.module)
    library.reinitialize(library.generation)  # every session and the login are gone
    digest = os.urandom(32)
    assert backend.sign_digest(key, digest).recover_public_key(digest) == key.public_key
    backend.check_health()


def test_token_removed_then_restored(
    softhsm: SoftHsm, metadata: SqliteMetadataStore, tmp_path: Path
) -> None:
    """What SoftHSM2 really does when its token folder disappears while signd runs.

    Cached key handles turn invalid (CKR_OBJECT_HANDLE_INVALID), searches find nothing and
    C_GetTokenInfo fails with CKR_GENERAL_ERROR; after a re-initialisation the token is gone
    from the slot list. Once the folder is back, only a re-initialisation makes the module see
    it again. signd must answer DependencyUnavailable meanwhile and sign again afterwards,
    without a restart.
    """
    backend = HsmBackend(softhsm.settings(LOSS_TOKEN, pool_size=2, reconnect_interval=0), metadata)
    try:
        (key,) = backend.create_keys("ethereum", eth_address)
        backend.sign_digest(key, os.urandom(32))
        folder = softhsm.token_dir(LOSS_TOKEN)
        parked = tmp_path / "parked-token"
        shutil.move(folder, parked)
        try:
            for _ in range(3):
                with pytest.raises(DependencyUnavailable) as raised:
                    backend.sign_digest(key, os.urandom(32))
                assert repr(LOSS_TOKEN) in str(raised.value)
                assert USER_PIN not in str(raised.value)
            with pytest.raises(DependencyUnavailable):
                backend.check_health()
        finally:
            shutil.move(parked, folder)
        digest = os.urandom(32)
        assert backend.sign_digest(key, digest).recover_public_key(digest) == key.public_key
        backend.check_health()
    finally:
        backend.close()


def test_reconnection_attempts_are_spaced_by_the_clock(
    softhsm: SoftHsm, metadata: SqliteMetadataStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    backend = HsmBackend(
        softhsm.settings(LOSS_TOKEN, pool_size=1, reconnect_interval=5.0),
        metadata,
        clock=lambda: now[0],
    )
    library = Pkcs11Library.load(softhsm.module)
    reinits: list[int] = []
    original = library.reinitialize

    def counting_reinitialize(seen: int) -> None:
        reinits.append(seen)
        original(seen)

    monkeypatch.setattr(library, "reinitialize", counting_reinitialize)
    try:
        (key,) = backend.create_keys("ethereum", eth_address)
        folder = softhsm.token_dir(LOSS_TOKEN)
        parked = tmp_path / "parked-token"
        shutil.move(folder, parked)
        try:
            with pytest.raises(DependencyUnavailable):
                backend.sign_digest(key, os.urandom(32))
            attempts = len(reinits)
            assert attempts >= 1
            now[0] += 1.0
            with pytest.raises(DependencyUnavailable):
                backend.sign_digest(key, os.urandom(32))
            assert len(reinits) == attempts, "no new attempt inside the interval"
        finally:
            shutil.move(parked, folder)
        now[0] += 1.0
        with pytest.raises(DependencyUnavailable):
            backend.sign_digest(key, os.urandom(32))
        now[0] += 5.0
        digest = os.urandom(32)
        assert backend.sign_digest(key, digest).recover_public_key(digest) == key.public_key
    finally:
        backend.close()


def test_token_wiped_and_reinitialised_is_an_integrity_error(
    softhsm: SoftHsm, metadata: SqliteMetadataStore
) -> None:
    """A token deleted and re-created under the same label comes back without our keys."""
    backend = HsmBackend(softhsm.settings(WIPE_TOKEN, pool_size=2, reconnect_interval=0), metadata)
    env = {**os.environ, "SOFTHSM2_CONF": str(softhsm.conf)}
    try:
        (key,) = backend.create_keys("ethereum", eth_address)
        backend.sign_digest(key, os.urandom(32))
        subprocess.run(
            ["softhsm2-util", "--delete-token", "--token", WIPE_TOKEN],
            check=True,
            capture_output=True,
            env=env,
        )
        with pytest.raises(DependencyUnavailable):
            backend.sign_digest(key, os.urandom(32))
        softhsm.init_token(WIPE_TOKEN)
        with pytest.raises(IntegrityError, match=key.details["cka_id"]):
            backend.sign_digest(key, os.urandom(32))
        (fresh,) = backend.create_keys("ethereum", eth_address)
        digest = os.urandom(32)
        assert backend.sign_digest(fresh, digest).recover_public_key(digest) == fresh.public_key
    finally:
        backend.close()


def test_signing_while_key_generation_fails_keeps_the_process_alive(
    softhsm: SoftHsm, tmp_path: Path
) -> None:
    """Four threads sign while a fifth creates keys on a token made read-only (chattr +i).

    Each failed creation used to drop the pool and re-initialise the module, and the module
    then gave the old session handles to new sessions; a thread that closed its old session
    closed another thread's open one, and SoftHSM2 crashed (SIGSEGV, double free) within
    seconds. (A token that still answers no longer costs a re-initialisation at all: see
    test_token_faults.py.) Here the process must live, answer DependencyUnavailable and
    recover.
    """
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("making the token read-only needs chattr as root")
    label = "signd-readonly"
    softhsm.init_token(label)
    folder = softhsm.token_dir(label)

    def chattr(flag: str) -> None:
        paths = [folder, *folder.iterdir()]
        subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)

    def read_only_for_a_while(say: Callable[[str], None]) -> None:
        time.sleep(0.5)
        chattr("+i")
        try:
            say("read-only")
            time.sleep(4)
        finally:
            chattr("-i")

    run = run_under_load(
        softhsm, label, tmp_path / "m.db", creators=1, signers=4, fault=read_only_for_a_while
    )
    assert run.returncode == 0, f"exit status {run.returncode}: {run.stderr[-2000:]}"
    counts = run.counts
    during = {name: n for name, n in counts.items() if name.startswith("read-only")}
    assert during.get("read-only create dependency_unavailable", 0) > 0, counts
    assert set(during) <= {
        "read-only create dependency_unavailable",
        "read-only create ok",  # began before the token was writable again, ended after
        "read-only sign dependency_unavailable",
        "read-only sign ok",
    }, counts
    assert counts.get("before sign ok", 0) > 0 and counts.get("before create ok", 0) > 0


SET_PIN_SCRIPT = """
import sys, pkcs11
module, label, old, new = sys.argv[1:5]
session = pkcs11.lib(module).get_token(token_label=label).open(rw=True, user_pin=old)
session.set_pin(old, new)
session.close()
"""


class CountingLogins:
    """The module's function list, counting C_Login calls."""

    def __init__(self, functions: Any) -> None:
        self._functions = functions
        self.logins = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._functions, name)

    def C_Login(self, *args: Any) -> Any:
        self.logins += 1
        return self._functions.C_Login(*args)


def test_a_pin_changed_on_the_hsm_is_tried_once_then_refused_without_logging_in(
    softhsm: SoftHsm, metadata: SqliteMetadataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token's PIN changed by another process while signd runs: the next login is
    refused, and signd must not keep sending that PIN (CloudHSM locks the user after a few
    failed logins) — neither on every reconnection nor from a new backend, which is what
    ``signd serve`` builds on each request while the HSM custody cannot open."""
    label, changed = "signd-pin-change", "changed-pin-" + os.urandom(4).hex()
    softhsm.init_token(label)
    library = Pkcs11Library.load(softhsm.module)
    library.reinitialize(library.generation)  # a loaded SoftHSM2 sees new tokens only then
    counting = CountingLogins(library._functions)
    monkeypatch.setattr(library, "_functions", counting)
    backend = HsmBackend(softhsm.settings(label, pool_size=2, reconnect_interval=0), metadata)
    try:
        (key,) = backend.create_keys("ethereum", eth_address)
        subprocess.run(
            [sys.executable, "-c", SET_PIN_SCRIPT, str(softhsm.module), label, USER_PIN, changed],
            check=True,
            capture_output=True,
        )
        library.reinitialize(library.generation)  # the login is gone; SoftHSM2 reads the PIN
        before = counting.logins
        for call in (lambda: backend.sign_digest(key, os.urandom(32)), backend.check_health):
            for _ in range(3):
                with pytest.raises(
                    PinRefused, match="refused signd's PIN: the HSM PIN is incorrect"
                ):
                    call()
        with pytest.raises(PinRefused):
            HsmBackend(softhsm.settings(label), metadata)
        assert counting.logins == before + 1, "the refused PIN was sent once"
        renewed = HsmBackend(softhsm.settings(label, pin=changed), metadata)
        digest = os.urandom(32)
        assert renewed.sign_digest(key, digest).recover_public_key(digest) == key.public_key
        renewed.close()
    finally:
        backend.close()


def test_the_mechanism_list_is_read_once_for_many_creates(
    softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the token has offered CKM_EC_KEY_PAIR_GEN and CKM_ECDSA, further creates do not
    list its mechanisms again (on CloudHSM each list is a network round trip); the health
    check still reads them."""
    token = HsmToken(softhsm.settings(pool_size=1))
    listed: list[str] = []
    original = HsmToken._require_mechanisms

    def counted(self: HsmToken, pooled: Any) -> None:
        listed.append("list")
        original(self, pooled)

    monkeypatch.setattr(HsmToken, "_require_mechanisms", counted)
    try:
        made = [token.generate_key(f"once-{n}") for n in range(3)]
        assert len({key.cka_id for key in made}) == 3
        assert listed == ["list"]
        token.check_health()
        assert listed == ["list", "list"]
    finally:
        token.close()
