from __future__ import annotations

import json
import logging
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from signd.errors import ConfigurationError, IntegrityError, InvalidField
from signd.kms import LocalKms, kms_from_config
from signd.kms.local import canonical_context

CONTEXT = {"key_id": "k-1", "address": "0xabc"}


@pytest.fixture
def kms(tmp_path: Path) -> LocalKms:
    return LocalKms(tmp_path)


def key_file(home: Path, alias: str = "signd-default") -> Path:
    return home / "kms" / f"{alias}.key"


def test_round_trip(kms: LocalKms) -> None:
    data_key = kms.generate_data_key(encryption_context=CONTEXT)
    assert len(data_key.plaintext.reveal_bytes()) == 32
    assert data_key.kms_key_id == kms.key_id
    assert kms.decrypt(data_key.ciphertext, encryption_context=CONTEXT) == data_key.plaintext


def test_data_keys_are_fresh(kms: LocalKms) -> None:
    first, second = kms.generate_data_key(), kms.generate_data_key()
    assert first.plaintext != second.plaintext
    assert first.ciphertext != second.ciphertext


def test_context_order_does_not_matter(kms: LocalKms) -> None:
    data_key = kms.generate_data_key(encryption_context={"a": "1", "b": "2"})
    assert kms.decrypt(data_key.ciphertext, encryption_context={"b": "2", "a": "1"}) == (
        data_key.plaintext
    )


def test_no_context_equals_empty_context(kms: LocalKms) -> None:
    data_key = kms.generate_data_key()
    assert kms.decrypt(data_key.ciphertext, encryption_context={}) == data_key.plaintext


@pytest.mark.parametrize(
    "context",
    [
        None,
        {},
        {"key_id": "k-2", "address": "0xabc"},
        {"key_id": "k-1"},
        {**CONTEXT, "extra": ""},
        {"key_id": "k-1", "address": "0xABC"},
    ],
)
def test_wrong_context_is_an_integrity_error(kms: LocalKms, context: dict[str, str]) -> None:
    data_key = kms.generate_data_key(encryption_context=CONTEXT)
    with pytest.raises(IntegrityError) as caught:
        kms.decrypt(data_key.ciphertext, encryption_context=context)
    assert caught.value.message == "data key ciphertext failed its integrity check"


def test_every_tampered_byte_is_detected(kms: LocalKms) -> None:
    blob = kms.generate_data_key(encryption_context=CONTEXT).ciphertext
    for index in range(len(blob)):
        tampered = bytearray(blob)
        tampered[index] ^= 0x01
        with pytest.raises(IntegrityError):
            kms.decrypt(bytes(tampered), encryption_context=CONTEXT)


@pytest.mark.parametrize(
    "mangle",
    [lambda b: b"", lambda b: b[:1], lambda b: b[:-1], lambda b: b + b"\x00", lambda b: b[4:]],
    ids=["empty", "first-byte", "truncated", "extended", "no-magic"],
)
def test_truncated_or_extended_blob_is_detected(
    kms: LocalKms, mangle: Callable[[bytes], bytes]
) -> None:
    blob = kms.generate_data_key().ciphertext
    with pytest.raises(IntegrityError):
        kms.decrypt(mangle(blob))


def test_blob_from_another_master_key_is_refused(tmp_path: Path) -> None:
    first = LocalKms(tmp_path / "one")
    second = LocalKms(tmp_path / "two")
    other_alias = LocalKms(tmp_path / "one", key_alias="other")
    assert len({first.key_id, second.key_id, other_alias.key_id}) == 3
    blob = first.generate_data_key(encryption_context=CONTEXT).ciphertext
    for foreign in (second, other_alias):
        with pytest.raises(IntegrityError):
            foreign.decrypt(blob, encryption_context=CONTEXT)


def test_blob_relabelled_with_another_key_id_is_refused(tmp_path: Path) -> None:
    """Same key material, different key id in the header: the AAD covers the header."""
    first = LocalKms(tmp_path / "one")
    second_home = tmp_path / "two"
    document = json.loads(key_file(tmp_path / "one").read_text())
    document["key_id"] = "0" * len(document["key_id"])
    key_file(second_home).parent.mkdir(parents=True)
    fd = os.open(key_file(second_home), os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, json.dumps(document).encode())
    os.close(fd)
    second = LocalKms(second_home)
    blob = first.generate_data_key().ciphertext
    relabelled = blob.replace(first.key_id.encode(), second.key_id.encode())
    with pytest.raises(IntegrityError):
        second.decrypt(relabelled)


def test_blob_is_versioned_and_names_its_key(kms: LocalKms) -> None:
    blob = kms.generate_data_key().ciphertext
    assert blob[:4] == b"SLK\x01"
    assert blob[5 : 5 + blob[4]].decode() == kms.key_id


def test_key_persists_across_instances(tmp_path: Path) -> None:
    data_key = LocalKms(tmp_path).generate_data_key(encryption_context=CONTEXT)
    reopened = LocalKms(tmp_path)
    assert reopened.decrypt(data_key.ciphertext, encryption_context=CONTEXT) == data_key.plaintext


def test_key_file_is_private(tmp_path: Path) -> None:
    LocalKms(tmp_path)
    path = key_file(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_group_or_world_accessible_key_file_is_refused(tmp_path: Path, mode: int) -> None:
    LocalKms(tmp_path)
    key_file(tmp_path).chmod(mode)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        LocalKms(tmp_path)


def test_symlinked_key_file_is_refused(tmp_path: Path) -> None:
    LocalKms(tmp_path / "real")
    link = key_file(tmp_path / "linked")
    link.parent.mkdir(parents=True)
    link.symlink_to(key_file(tmp_path / "real"))
    with pytest.raises(ConfigurationError):
        LocalKms(tmp_path / "linked")


@pytest.mark.parametrize(
    "content",
    [b"", b"not json", b"[]", b'{"version": 1}', b'{"version": 2, "key_id": "x", "key": ""}'],
)
def test_malformed_key_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = key_file(tmp_path)
    path.parent.mkdir(parents=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(ConfigurationError, match="malformed"):
        LocalKms(tmp_path)


def test_concurrent_first_runs_agree_on_one_key(tmp_path: Path) -> None:
    instances: list[LocalKms] = []
    barrier = threading.Barrier(8)

    def create() -> None:
        barrier.wait()
        instances.append(LocalKms(tmp_path))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(instances) == 8
    assert len({kms.key_id for kms in instances}) == 1
    assert [p.name for p in key_file(tmp_path).parent.iterdir()] == ["signd-default.key"]


@pytest.mark.parametrize("alias", ["", "../escape", "a/b", "x" * 65])
def test_bad_alias_is_refused(tmp_path: Path, alias: str) -> None:
    with pytest.raises(ConfigurationError):
        LocalKms(tmp_path, key_alias=alias)


def test_context_must_be_strings(kms: LocalKms) -> None:
    with pytest.raises(InvalidField):
        kms.generate_data_key(encryption_context={"n": 1})  # type: ignore[dict-item]


def test_canonical_context_is_stable() -> None:
    assert canonical_context({"b": "2", "a": "é"}) == '{"a":"é","b":"2"}'.encode()
    assert canonical_context(None) == canonical_context({}) == b"{}"


def test_secrets_stay_out_of_reprs_errors_and_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    kms = LocalKms(tmp_path)
    master_key = json.loads(key_file(tmp_path).read_text())["key"]
    data_key = kms.generate_data_key(encryption_context=CONTEXT)
    plaintext = data_key.plaintext.reveal_bytes()
    with pytest.raises(IntegrityError) as caught:
        kms.decrypt(data_key.ciphertext, encryption_context={})
    texts = [repr(kms), repr(data_key), str(data_key), str(caught.value), caplog.text]
    texts.append(repr(caught.value.__cause__) + repr(caught.value.__context__))
    for text in texts:
        assert master_key not in text
        assert plaintext.hex() not in text
        assert repr(plaintext)[2:-1] not in text


def test_factory_builds_local_by_default(tmp_path: Path) -> None:
    kms = kms_from_config({}, tmp_path)
    assert isinstance(kms, LocalKms)
    named = kms_from_config({"type": "local", "key_alias": "custody"}, tmp_path)
    assert key_file(tmp_path, "custody").exists()
    assert named.kms_type == "local"


@pytest.mark.parametrize(
    "settings",
    [
        {"type": "vault"},
        {"type": "local", "keyalias": "x"},
        {"type": "local", "key_alias": 3},
        {"type": "aws"},
        {"type": "aws", "key_id": "k", "max_attempts": "3"},
        {"type": "aws", "key_id": "k", "connect_timeout": True},
    ],
)
def test_factory_refuses_bad_settings(tmp_path: Path, settings: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        kms_from_config(settings, tmp_path)
