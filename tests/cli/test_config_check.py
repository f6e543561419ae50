"""``signd config check`` against real dependencies, and ``SIGND_<SECTION>_<KEY>`` overrides.

With no ``[enclave] transport`` the enclave custody probe starts the local enclave process, so
these checks also prove that the enclave side reaches KMS and storage with the same config.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from signd.cli.main import app
from signd.config import apply_environment, load_settings
from signd.storage.postgres import PostgresMetadataStore
from tests.cli.conftest import Cli
from tests.fixtures.servers import (  # noqa: F401 - registers the server fixtures
    TEST_PASSWORD,
    MotoServer,
    PostgresServer,
    free_port,
    moto_server_fixture,
    postgres_server_fixture,
)
from tests.fixtures.servers import moto_server as running_moto_server
from tests.integration.support import AWS_ENV, aws_tables, child_pids, short_dir, write_config

pytestmark = pytest.mark.integration

PARTS = ["kms", "blobs", "metadata", "custody:enclave", "custody:keystore"]


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture(autouse=True)
def temp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Where this test's temp folders (the local enclave's socket folder) go; removed after.

    (``tmp_path`` first, so that pytest's own temp root is settled before this patch.)
    """
    with short_dir() as root:
        monkeypatch.setattr(tempfile, "tempdir", str(root))
        yield root


def configure(cli: Cli, tables: dict[str, dict[str, Any]]) -> None:
    write_config(cli.home, {"keystore": {"scrypt_n": 1024}, **tables})


def new_bucket(moto: MotoServer) -> str:
    bucket = "signd-check-" + secrets.token_hex(4)
    moto.client("s3").create_bucket(Bucket=bucket)
    return bucket


def aws_config(moto: MotoServer, bucket: str, dsn: str) -> dict[str, dict[str, Any]]:
    return aws_tables(
        kms_endpoint=moto.endpoint_url,
        key_id=moto.client("kms").create_key()["KeyMetadata"]["KeyId"],
        s3_endpoint=moto.endpoint_url,
        bucket=bucket,
        dsn=dsn,
        timeout=2.0,
    )


def check(cli: Cli, *, ok: bool) -> dict[str, dict[str, str]]:
    """Run ``config check --json``; the parts by name (exit status 0 iff ``ok``)."""
    result = cli.run("config", "check", "--json", ok=ok)
    assert result["ok"] is ok
    assert result["config_file"] == str(cli.home / "signd.toml")
    parts = {part["part"]: part for part in result["parts"]}
    assert list(parts) == PARTS
    return parts


def test_everything_reachable(
    cli: Cli, moto_server: MotoServer, postgres_server: PostgresServer
) -> None:
    dsn = postgres_server.create_schema()
    configure(cli, aws_config(moto_server, new_bucket(moto_server), dsn))
    parts = check(cli, ok=True)
    assert all(part["status"] == "ok" for part in parts.values()), parts
    assert child_pids_of_home(cli) == []  # the probe's local enclave stopped with the command


def child_pids_of_home(cli: Cli) -> list[int]:
    return child_pids(os.getpid(), containing=f"--home {cli.home} enclave")


@pytest.fixture
def own_moto() -> Iterator[MotoServer]:
    """A moto server this test may stop."""
    with running_moto_server() as server:
        yield server


def test_moto_down_is_reported_unreachable(
    cli: Cli, own_moto: MotoServer, postgres_server: PostgresServer
) -> None:
    dsn = postgres_server.create_schema()
    configure(cli, aws_config(own_moto, new_bucket(own_moto), dsn))
    assert all(part["status"] == "ok" for part in check(cli, ok=True).values())

    own_moto.stop()
    parts = check(cli, ok=False)
    for name in ("kms", "blobs", "custody:enclave"):
        assert parts[name]["status"] == "unreachable", parts[name]
        assert parts[name]["code"] == "dependency_unavailable"
    assert "KMS" in parts["kms"]["message"]
    assert "S3" in parts["blobs"]["message"]
    assert parts["metadata"]["status"] == parts["custody:keystore"]["status"] == "ok"


def test_postgres_down_is_unreachable_and_the_password_never_shows(cli: Cli) -> None:
    dsn = f"postgresql://signd:{TEST_PASSWORD}@127.0.0.1:{free_port()}/signd"
    configure(cli, {"metadata": {"type": "postgres", "dsn": dsn, "timeout": 2}})
    result = cli.runner.invoke(app, ["--home", str(cli.home), "config", "check", "--json"])
    assert result.exit_code == 1
    assert TEST_PASSWORD not in result.output
    parts = check(cli, ok=False)
    assert parts["metadata"]["status"] == parts["custody:enclave"]["status"] == "unreachable"
    assert parts["kms"]["status"] == parts["blobs"]["status"] == "ok"


@pytest.mark.parametrize(
    ("section", "table", "message"),
    [
        ("kms", {"type": "nope"}, "unknown KMS type 'nope'"),
        ("blobs", {"type": "nope"}, "unknown blobs.type 'nope'"),
        ("metadata", {"type": "nope"}, "unknown metadata.type 'nope'"),
        ("blobs", {"type": "s3", "bucket": "b", "max_attempts": 0}, "blobs.max_attempts"),
        ("metadata", {"type": "sqlite", "dns": "typo"}, "unknown settings in [metadata]: dns"),
    ],
)
def test_invalid_settings_are_reported_invalid(
    cli: Cli, section: str, table: dict[str, Any], message: str
) -> None:
    configure(cli, {section: table})
    parts = check(cli, ok=False)
    assert parts[section]["status"] == "invalid"
    assert message in parts[section]["message"]
    assert parts["custody:enclave"]["status"] != "ok"  # the enclave uses the same config
    # the keystore is checked against the metadata store's record of it (so needs that store)
    keystore_status = "unreachable" if section == "metadata" else "ok"
    assert parts["custody:keystore"]["status"] == keystore_status
    others = {"kms", "blobs", "metadata"} - {section}
    assert all(parts[name]["status"] == "ok" for name in others)


def test_an_error_is_printed_as_written_brackets_included(cli: Cli) -> None:
    """A message naming a ``[table]`` is printed as it is, not read as console markup."""
    configure(cli, {"metadata": {"type": "sqlite", "dns": "typo"}})
    result = cli.run("keys", "list", "--custody", "enclave", ok=False)
    assert "unknown settings in [metadata]: dns" in result.output


def test_an_enclave_custody_that_fails_to_open_leaves_no_socket_folder(
    cli: Cli, temp_root: Path
) -> None:
    """The metadata store is built before the local enclave's socket folder is made."""
    configure(cli, {"metadata": {"type": "nope"}})
    assert check(cli, ok=False)["custody:enclave"]["status"] == "unreachable"
    assert list(temp_root.glob("signd-enclave-*")) == []


def test_environment_overrides_the_file() -> None:
    raw = {"metadata": {"type": "sqlite", "path": "/x.db"}, "kms": {"type": "local"}}
    merged = apply_environment(
        raw,
        {
            "SIGND_METADATA_TYPE": "postgres",
            "SIGND_METADATA_DSN": "postgresql://h/db?options=-c%20search_path%3Ds",
            "SIGND_METADATA_PASSWORD": "never-from-env",
            "SIGND_KMS_MAX_ATTEMPTS": "3",
            "SIGND_KMS_READ_TIMEOUT": "2.5",
            "SIGND_CUSTODY_ENABLED": '["enclave"]',
            "SIGND_ENCLAVE_": "ignored",
            "OTHER_KMS_TYPE": "ignored",
        },
    )
    assert merged["metadata"] == {
        "type": "postgres",
        "path": "/x.db",
        "dsn": "postgresql://h/db?options=-c%20search_path%3Ds",
    }
    assert merged["kms"] == {"type": "local", "max_attempts": 3, "read_timeout": 2.5}
    assert merged["custody"] == {"enabled": ["enclave"]}
    assert "enclave" not in merged
    assert raw["metadata"]["type"] == "sqlite"  # the parsed file is not modified


def test_a_variable_overrides_the_table_with_the_longest_matching_name() -> None:
    """``SIGND_KMS_CUSTODY_REGION`` is ``[kms_custody] region``; it was also read as
    ``[kms] custody_region``, which the local KMS then refused as an unknown setting."""
    merged = apply_environment(
        {"kms": {"type": "local"}},
        {"SIGND_KMS_CUSTODY_REGION": "eu-west-1", "SIGND_KMS_TYPE": "local"},
    )
    assert merged["kms"] == {"type": "local"}
    assert merged["kms_custody"] == {"region": "eu-west-1"}


def test_a_kms_custody_variable_leaves_the_local_kms_working(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIGND_KMS_CUSTODY_REGION", "eu-west-1")
    settings = load_settings(tmp_path)
    assert "custody_region" not in settings.section("kms")
    assert settings.section("kms_custody")["region"] == "eu-west-1"


def test_environment_alone_selects_kms_s3_and_postgres(
    cli: Cli,
    moto_server: MotoServer,
    postgres_server: PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The file says nothing about storage; SIGND_* variables pick the several-nodes stack,
    for the host and (inherited) for the enclave process it starts."""
    configure(cli, {})
    bucket, dsn = new_bucket(moto_server), postgres_server.create_schema()
    key_id = moto_server.client("kms").create_key()["KeyMetadata"]["KeyId"]
    overrides = {
        "SIGND_KMS_TYPE": "aws",
        "SIGND_KMS_KEY_ID": key_id,
        "SIGND_KMS_REGION": "us-east-1",
        "SIGND_KMS_ENDPOINT_URL": moto_server.endpoint_url,
        "SIGND_BLOBS_TYPE": "s3",
        "SIGND_BLOBS_BUCKET": bucket,
        "SIGND_BLOBS_ENDPOINT_URL": moto_server.endpoint_url,
        "SIGND_BLOBS_REGION": "us-east-1",
        "SIGND_METADATA_TYPE": "postgres",
        "SIGND_METADATA_DSN": dsn,
        "SIGND_METADATA_TIMEOUT": "2",
    }
    for name, value in overrides.items():
        monkeypatch.setenv(name, value)
    assert load_settings(cli.home).section("metadata")["timeout"] == 2

    keys = cli.run("keys", "new", "--custody", "enclave", "--count", "2", "--json")["keys"]
    signature = cli.run("sign", "hash", "--key", keys[1]["address"], "0x" + "77" * 32, "--json")
    assert signature["recovery_id"] in (0, 1)

    store = PostgresMetadataStore(dsn)
    try:
        assert [store.find(key["key_id"]) is not None for key in keys] == [True, True]
    finally:
        store.close()
    listing = moto_server.client("s3").list_objects_v2(Bucket=bucket)
    # one batch blob holds both sealed keys; each key's reference names its byte range in it
    assert listing["KeyCount"] == 1
    [blob] = listing["Contents"]
    assert {key["details"]["blob"].split("@")[0] for key in keys} == {blob["Key"].split("/")[-1]}
    leftovers = {path.name for path in Path(cli.home).iterdir()}
    assert not leftovers & {"metadata.db", "blobs", "kms"}
