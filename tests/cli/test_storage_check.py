"""``signd storage check`` on both storage stacks, with keys made by the real enclave custody.

``local``: LocalKms + filesystem blobs + SQLite; ``aws``: AWS KMS and S3 on moto_server +
PostgreSQL. An enclave listens on a real Unix socket in this process and an EnclaveBackend
creates keys through it, as in ``tests/enclave/test_stores_matrix.py``; the command under
test builds its own stores from the same ``signd.toml``. Lost keys are made by deleting or
cutting short a batch blob, orphans by writing a blob directly, by a create whose
PostgreSQL write fails, or by checking against a restored older copy of the metadata store.
Orphans are never deleted, only moved to the blob store's quarantine, from where the tests
move them back by hand as an operator would.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from signd.cli.context import state
from signd.cli.main import app
from signd.config import load_settings
from signd.custody.base import KeyInfo, utc_now
from signd.custody.enclave import EnclaveBackend
from signd.enclave.client import EnclaveClient
from signd.enclave.references import BlobRange
from signd.enclave.server import EnclaveServer, start_enclave
from signd.enclave.transport import UnixTransport
from signd.errors import DependencyUnavailable, KeyNotFound
from signd.kms.base import KmsClient
from signd.operations import Signer
from signd.operations.components import build_blob_store, build_kms, build_metadata_store
from signd.operations.storage_check import (
    check_storage,
    index_records,
    quarantine_orphans,
    survey,
)
from signd.storage.base import BlobStat, BlobStore, MetadataStore
from signd.storage.blobs import MARKER, QUARANTINE_FOLDER, FilesystemBlobStore
from signd.storage.s3 import S3BlobStore
from signd.storage.sqlite import SqliteMetadataStore
from tests.cli.conftest import Cli
from tests.fixtures.servers import (  # noqa: F401 - registers the server fixtures
    TEST_PASSWORD,
    MotoServer,
    PostgresServer,
    free_port,
    moto_server_fixture,
    postgres_server_fixture,
    s3_bucket,
)
from tests.integration.support import aws_tables, local_tables, short_dir, write_config

pytestmark = pytest.mark.integration

BATCH = 4
DIGEST = b"\x5a" * 32
LATER = timedelta(hours=2)


@dataclass
class Stack:
    kind: str
    home: Path
    tables: dict[str, dict[str, Any]]
    blobs: BlobStore
    metadata: MetadataStore
    signer: Signer
    s3: Any = None
    """A plain boto3 client of the S3 stack's endpoint: an operator's own tools."""

    def create(self, count: int) -> list[KeyInfo]:
        return self.signer.create_keys(chain="ethereum", custody="enclave", count=count)

    def sign(self, key: KeyInfo) -> None:
        signature = self.signer.sign_hash(key.key_id, DIGEST)
        assert signature.recover_public_key(DIGEST) == key.public_key

    def orphan(self, size: int = 500) -> str:
        """A sealed-looking blob no record names, written as a failed create leaves one."""
        name = "enclave-batch-" + os.urandom(16).hex()
        self.blobs.put(name, os.urandom(size))
        return name

    def age(self, name: str, by: timedelta) -> None:
        """Make a filesystem blob look written ``by`` ago (S3 keeps its own time)."""
        assert isinstance(self.blobs, FilesystemBlobStore)
        then = (utc_now() - by).timestamp()
        os.utime(self.blobs.path_of(name), (then, then))

    def read_quarantined(self, where: str) -> bytes:
        """The bytes at a quarantine location, read as an operator would."""
        if self.s3 is None:
            return Path(where).read_bytes()
        url = urlsplit(where)
        body: bytes = self.s3.get_object(Bucket=url.netloc, Key=url.path[1:])["Body"].read()
        return body

    def move_back(self, where: str, name: str) -> None:
        """Undo a quarantine by hand: ``mv`` it to its shard folder, ``aws s3 mv`` it back."""
        if isinstance(self.blobs, FilesystemBlobStore):
            os.rename(where, self.blobs.path_of(name))
            return
        assert isinstance(self.blobs, S3BlobStore)
        url = urlsplit(where)
        bucket, key = url.netloc, url.path[1:]
        self.s3.copy_object(
            Bucket=bucket, Key=self.blobs.prefix + name, CopySource={"Bucket": bucket, "Key": key}
        )
        self.s3.delete_object(Bucket=bucket, Key=key)

    def restored_metadata(
        self, keys: list[KeyInfo], request: pytest.FixtureRequest
    ) -> MetadataStore:
        """A metadata store holding only the records of ``keys``, as a backup restored from
        before the others were created would."""
        restored: MetadataStore
        if self.kind == "local":
            restored = SqliteMetadataStore(self.home / "restored.db")
        else:
            from signd.storage.postgres import PostgresMetadataStore

            postgres: PostgresServer = request.getfixturevalue("postgres_server")
            restored = PostgresMetadataStore(postgres.create_schema())
        records = [self.metadata.find(key.key_id) for key in keys]
        restored.add([record for record in records if record is not None])
        return restored


def blob_of(key: KeyInfo) -> BlobRange:
    where = BlobRange.parse(key.details["blob"])
    assert where is not None
    return where


@pytest.fixture(params=["local", "aws"])
def stack(request: pytest.FixtureRequest, cli: Cli) -> Iterator[Stack]:
    s3 = None
    if request.param == "local":
        tables = local_tables()
    else:
        moto: MotoServer = request.getfixturevalue("moto_server")
        s3 = moto.client("s3")
        postgres: PostgresServer = request.getfixturevalue("postgres_server")
        tables = aws_tables(
            kms_endpoint=moto.endpoint_url,
            key_id=moto.client("kms").create_key()["KeyMetadata"]["KeyId"],
            s3_endpoint=moto.endpoint_url,
            bucket=request.getfixturevalue("s3_bucket"),
            dsn=postgres.create_schema(),
        )
    tables["keystore"] = {"scrypt_n": 1024}
    write_config(cli.home, tables)
    settings = load_settings(cli.home)
    kms: KmsClient = build_kms(settings)
    blobs, metadata = build_blob_store(settings), build_metadata_store(settings)
    with short_dir() as run:
        server: EnclaveServer = start_enclave(f"unix://{run / 'enclave.sock'}", kms, blobs)
        client = EnclaveClient(UnixTransport(str(run / "enclave.sock")), timeout=10.0)
        backend = EnclaveBackend(client, metadata, batch_size=BATCH)
        signer = Signer({"enclave": lambda: backend})
        try:
            yield Stack(request.param, cli.home, tables, blobs, metadata, signer, s3)
        finally:
            signer.close()
            server.close()
            for component in (kms, blobs, metadata):
                component.close()


local_only = pytest.mark.parametrize("stack", ["local"], indirect=True)
aws_only = pytest.mark.parametrize("stack", ["aws"], indirect=True)


def run(cli: Cli, *args: str, as_json: bool = True) -> tuple[int, Any]:
    """``signd --home HOME storage check [--json] ARGS``: exit status and JSON (or text)."""
    state.close()
    result = cli.runner.invoke(
        app, ["--home", str(cli.home), "storage", "check", *(["--json"] if as_json else []), *args]
    )
    state.close()
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result.exit_code, json.loads(result.stdout) if as_json else result.output


def later() -> datetime:
    return utc_now() + LATER


# --------------------------------------------------------------------------- reports


def test_consistent_stores_exit_0(stack: Stack, cli: Cli) -> None:
    stack.create(1)
    stack.create(6)  # two batch blobs of 4 and 2 keys
    code, report = run(cli)
    assert code == 0
    assert report["ok"] is True
    assert (report["records"], report["blobs"]) == (7, 3)
    assert report["lost_keys"] == report["orphans"] == []
    code, text = run(cli, as_json=False)
    assert code == 0
    assert "7 enclave key records, 3 blobs" in text
    assert "result: consistent" in text


def test_a_missing_batch_blob_is_key_loss_exit_1(stack: Stack, cli: Cli) -> None:
    keys = stack.create(6)
    lost, kept = keys[:BATCH], keys[BATCH:]
    stack.blobs.delete(blob_of(lost[0]).name)
    with pytest.raises(KeyNotFound):
        stack.sign(lost[0])  # really lost: what the check must find before anyone signs

    code, report = run(cli)
    assert code == 1
    assert report["ok"] is False
    assert report["orphans"] == []
    assert {entry["key_id"]: entry for entry in report["lost_keys"]} == {
        key.key_id: {
            "key_id": key.key_id,
            "chain": "ethereum",
            "address": key.address,
            "blob": key.details["blob"],
            "problem": "missing",
            "blob_size": None,
            "needed": blob_of(key).end,
        }
        for key in lost
    }
    stack.sign(kept[0])
    code, text = run(cli, as_json=False)
    assert code == 1
    assert "KEY LOSS: 4 keys cannot sign" in text
    assert all(key.key_id in text and key.address in text for key in lost)


def test_a_blob_cut_short_loses_only_the_keys_past_its_end(stack: Stack, cli: Cli) -> None:
    keys = stack.create(BATCH)
    name = blob_of(keys[0]).name
    data = stack.blobs.get(name)
    stack.blobs.delete(name)
    stack.blobs.put(name, data[:-1])

    code, report = run(cli)
    assert code == 1
    [short] = report["lost_keys"]
    assert short["key_id"] == keys[-1].key_id
    assert (short["problem"], short["blob_size"], short["needed"]) == (
        "short",
        len(data) - 1,
        len(data),
    )
    for key in keys[:-1]:
        stack.sign(key)
    with pytest.raises(KeyNotFound):
        stack.sign(keys[-1])


def test_records_are_paged_through(stack: Stack, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("signd.operations.storage_check.PAGE_SIZE", 3)
    keys = stack.create(10)
    stack.blobs.delete(blob_of(keys[-1]).name)  # the last batch, found on the last page
    code, report = run(cli)
    assert (code, report["records"]) == (1, 10)
    assert [entry["key_id"] for entry in report["lost_keys"]] == [k.key_id for k in keys[8:]]


def test_an_orphan_alone_exits_3_and_a_young_one_is_kept(stack: Stack, cli: Cli) -> None:
    stack.create(2)
    name = stack.orphan(size=777)
    code, report = run(cli)
    assert code == 3
    assert report["lost_keys"] == []
    [orphan] = report["orphans"]
    assert (orphan["name"], orphan["size"]) == (name, 777)
    assert 0 <= orphan["age_seconds"] < 60
    assert datetime.fromisoformat(orphan["modified"]).tzinfo is not None

    code, report = run(cli, "--quarantine-orphans")
    assert code == 3
    assert report["orphans"][0]["action"] == "too young"
    assert report["orphans"][0]["moved_to"] is None
    assert report["quarantined"] == 0
    assert report["in_quarantine"] == {"blobs": 0, "bytes": 0}
    assert stack.blobs.stat(name) is not None
    code, text = run(cli, as_json=False)
    assert "orphans: 1 blobs no record names" in text
    assert name in text
    assert "result: no key lost; 1 orphans" in text


@local_only
def test_the_command_quarantines_old_orphans_only(stack: Stack, cli: Cli) -> None:
    keys = stack.create(3)
    old, young = stack.orphan(size=500), stack.orphan(size=400)
    old_bytes = stack.blobs.get(old)
    stack.age(old, timedelta(hours=2))
    stack.age(blob_of(keys[0]).name, timedelta(days=3))  # an old key's blob stays
    assert isinstance(stack.blobs, FilesystemBlobStore)
    quarantine = stack.blobs.root / QUARANTINE_FOLDER

    code, report = run(cli, "--quarantine-orphans")
    assert code == 3  # the young orphan remains
    assert {o["name"]: (o["action"], o["moved_to"]) for o in report["orphans"]} == {
        old: ("quarantined", str(quarantine / old)),
        young: ("too young", None),
    }
    assert report["in_quarantine"] == {"blobs": 0, "bytes": 0}  # held before this run
    assert stack.blobs.stat(old) is None
    assert stack.read_quarantined(str(quarantine / old)) == old_bytes

    code, report = run(cli, "--quarantine-orphans", "--older-than", "600")
    assert report["orphans"][0]["action"] == "too young"
    assert report["in_quarantine"] == {"blobs": 1, "bytes": 500}
    stack.age(young, timedelta(minutes=11))
    code, text = run(cli, "--quarantine-orphans", "--older-than", "600", as_json=False)
    assert code == 0
    assert f"[quarantined to {quarantine / young}]" in text
    assert "in quarantine from earlier runs: 1 blobs, 500 bytes" in text
    assert "quarantined 1 orphans" in text
    assert "result: consistent" in text
    for key in keys:
        stack.sign(key)
    code, report = run(cli)
    assert (code, report["in_quarantine"]) == (0, {"blobs": 2, "bytes": 900})


@aws_only
def test_old_orphans_on_s3_are_quarantined(stack: Stack) -> None:
    keys = stack.create(2)
    name = stack.orphan(size=321)
    data = stack.blobs.get(name)
    report = check_storage(stack.metadata, stack.blobs, now=later())
    moves = quarantine_orphans(report, stack.metadata, stack.blobs, now=later)
    bucket = stack.tables["blobs"]["bucket"]
    where = f"s3://{bucket}/signd/quarantine/{name}"
    assert [(o.name, o.action, o.moved_to) for o in moves.outcomes] == [
        (name, "quarantined", where)
    ]
    assert stack.blobs.stat(name) is None
    assert stack.read_quarantined(where) == data
    for key in keys:
        stack.sign(key)
    report = check_storage(stack.metadata, stack.blobs)
    assert report.consistent
    assert report.in_quarantine.to_dict() == {"blobs": 1, "bytes": 321}


@aws_only
def test_postgres_down_during_a_create_leaves_an_orphan_the_check_finds(
    stack: Stack, cli: Cli, postgres_server: PostgresServer
) -> None:
    [key] = stack.create(1)
    before = {blob.name for blob in stack.blobs.list_blobs()}
    postgres_server.stop()
    try:
        with pytest.raises(DependencyUnavailable):
            stack.create(2)
    finally:
        postgres_server.start()
    [orphan] = {blob.name for blob in stack.blobs.list_blobs()} - before

    code, report = run(cli)
    assert code == 3
    assert report["lost_keys"] == []
    assert [o["name"] for o in report["orphans"]] == [orphan]
    report = check_storage(stack.metadata, stack.blobs, now=later())
    moves = quarantine_orphans(report, stack.metadata, stack.blobs, now=later)
    assert [(o.name, o.action) for o in moves.outcomes] == [(orphan, "quarantined")]
    stack.sign(key)
    assert run(cli)[0] == 0


# --------------------------------------------------------------------------- the race


def test_a_create_racing_the_check_is_never_quarantined(stack: Stack) -> None:
    """Records walked, then a create stores a blob and records it, then the blobs are listed
    and orphans quarantined: the new blob looks like an orphan to this run, and is kept by
    the age guard, and, were the clock wrong, by the look-up just before the move."""
    [earlier] = stack.create(1)
    index = index_records(stack.metadata)
    [new] = stack.create(1)
    report = survey(index, stack.metadata, stack.blobs)
    assert [orphan.name for orphan in report.orphans] == [blob_of(new).name]

    moves = quarantine_orphans(report, stack.metadata, stack.blobs)
    assert [outcome.action for outcome in moves.outcomes] == ["too young"]
    stale = survey(index, stack.metadata, stack.blobs, now=later())
    moves = quarantine_orphans(stale, stack.metadata, stack.blobs, now=later)
    assert [outcome.action for outcome in moves.outcomes] == ["named by a record"]

    stack.sign(new)
    stack.sign(earlier)
    assert check_storage(stack.metadata, stack.blobs).consistent


def test_nothing_is_quarantined_while_keys_are_lost(stack: Stack, cli: Cli) -> None:
    keys = stack.create(2)
    stack.blobs.delete(blob_of(keys[0]).name)
    name = stack.orphan()
    report = check_storage(stack.metadata, stack.blobs, now=later())
    moves = quarantine_orphans(report, stack.metadata, stack.blobs, now=later)
    assert moves.refused is not None
    assert [outcome.action for outcome in moves.outcomes] == ["not tried"]
    assert stack.blobs.stat(name) is not None
    code, result = run(cli, "--quarantine-orphans")
    assert (code, result["quarantined"]) == (1, 0)
    assert "keys are lost" in result["quarantine_refused"]


def test_nothing_is_quarantined_against_a_metadata_store_without_records(stack: Stack) -> None:
    name = stack.orphan()
    report = check_storage(stack.metadata, stack.blobs, now=later())
    moves = quarantine_orphans(report, stack.metadata, stack.blobs, now=later)
    assert moves.refused is not None
    assert "no enclave key record" in moves.refused
    assert stack.blobs.stat(name) is not None


def test_a_restored_older_metadata_store_loses_no_key(
    stack: Stack, cli: Cli, request: pytest.FixtureRequest
) -> None:
    """The case the guards cannot see: a backup restored from before some keys were made
    has records, and its keys' blobs are all there. The later keys' blobs look like old
    orphans, and are quarantined; with the right store back they are lost keys until an
    operator moves them back by hand, and then they sign."""
    [kept] = stack.create(1)
    restored = stack.restored_metadata([kept], request)
    try:
        later_keys = stack.create(2)
        name = blob_of(later_keys[0]).name
        data = stack.blobs.get(name)
        report = check_storage(restored, stack.blobs, now=later())
        assert (report.records, report.lost, [o.name for o in report.orphans]) == (1, [], [name])
        moves = quarantine_orphans(report, restored, stack.blobs, now=later)
    finally:
        restored.close()
    [outcome] = moves.outcomes
    assert (outcome.action, moves.error, moves.refused) == ("quarantined", None, None)
    assert outcome.moved_to is not None
    assert stack.read_quarantined(outcome.moved_to) == data

    code, report = run(cli)  # the right metadata store again
    assert code == 1
    assert {lost["key_id"] for lost in report["lost_keys"]} == {k.key_id for k in later_keys}
    assert report["in_quarantine"] == {"blobs": 1, "bytes": len(data)}

    stack.move_back(outcome.moved_to, name)
    code, report = run(cli)
    assert (code, report["ok"], report["in_quarantine"]) == (0, True, {"blobs": 0, "bytes": 0})
    for key in [kept, *later_keys]:
        stack.sign(key)


@local_only
def test_an_orphan_whose_name_is_taken_in_quarantine_stays(stack: Stack, cli: Cli) -> None:
    stack.create(1)
    name = stack.orphan()
    data = stack.blobs.get(name)
    stack.age(name, timedelta(hours=2))
    assert isinstance(stack.blobs, FilesystemBlobStore)
    taken = stack.blobs.root / QUARANTINE_FOLDER / name
    taken.parent.mkdir()
    taken.write_bytes(b"another blob of that name, quarantined earlier")

    code, report = run(cli, "--quarantine-orphans")
    assert code == 3
    assert [(o["action"], o["moved_to"]) for o in report["orphans"]] == [
        ("name taken in quarantine", None)
    ]
    assert (report["quarantined"], report["quarantine_error"]) == (0, None)
    assert stack.blobs.get(name) == data
    assert taken.read_bytes() == b"another blob of that name, quarantined earlier"


# --------------------------------------------------------------------------- no secrets


class ListsOnly(BlobStore):
    """The real store, except that reading, writing or deleting a blob fails the test."""

    def __init__(self, inner: BlobStore, *, fail_moves_after: int | None = None) -> None:
        self.inner = inner
        self.fail_moves_after = fail_moves_after
        self.moves = 0

    def put(self, name: str, data: bytes) -> None:
        raise AssertionError("the check wrote a blob")

    def get(self, name: str) -> bytes:
        raise AssertionError("the check read a blob")

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        raise AssertionError("the check read a blob")

    def delete(self, name: str) -> None:
        raise AssertionError("the check deleted a blob")

    def quarantine(self, name: str) -> str:
        if self.fail_moves_after is not None and self.moves >= self.fail_moves_after:
            raise DependencyUnavailable("blob store went away")
        self.moves += 1
        return self.inner.quarantine(name)

    def stat(self, name: str) -> BlobStat | None:
        return self.inner.stat(name)

    def list_blobs(self, prefix: str = "") -> Iterator[BlobStat]:
        return self.inner.list_blobs(prefix)

    def list_quarantined(self) -> Iterator[BlobStat]:
        return self.inner.list_quarantined()


def test_the_check_never_reads_a_blob(stack: Stack) -> None:
    keys = stack.create(6)
    last = blob_of(keys[-1])
    stack.blobs.delete(last.name)
    name = stack.orphan()
    report = check_storage(stack.metadata, ListsOnly(stack.blobs), now=later())
    assert (len(report.lost), len(report.orphans)) == (2, 1)
    stack.blobs.put(last.name, bytes(last.end))  # the right size is all the check can see
    report = check_storage(stack.metadata, ListsOnly(stack.blobs), now=later())
    assert report.lost == []
    moves = quarantine_orphans(report, stack.metadata, ListsOnly(stack.blobs), now=later)
    assert [(outcome.name, outcome.action) for outcome in moves.outcomes] == [(name, "quarantined")]


@local_only
def test_a_store_failing_mid_quarantine_stops_with_the_report_and_exit_4(
    stack: Stack, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack.create(1)
    orphans = [stack.orphan() for _ in range(3)]
    for index, name in enumerate(orphans):
        stack.age(name, timedelta(hours=3 - index))  # moved oldest first
    real_build = build_blob_store

    def failing_build(settings: Any) -> BlobStore:
        return ListsOnly(real_build(settings), fail_moves_after=1)

    monkeypatch.setattr("signd.operations.components.build_blob_store", failing_build)
    code, report = run(cli, "--quarantine-orphans")
    assert code == 4
    assert [o["action"] for o in report["orphans"]] == ["quarantined", "failed", "not tried"]
    assert report["quarantine_error"]["code"] == "dependency_unavailable"
    assert [stack.blobs.stat(name) is None for name in orphans] == [True, False, False]
    assert [blob.name for blob in stack.blobs.list_quarantined()] == orphans[:1]
    code, text = run(cli, "--quarantine-orphans", as_json=False)
    assert code == 4
    assert "error dependency_unavailable: blob store went away" in text


# --------------------------------------------------------------------------- faults


def test_postgres_unreachable_exits_4_without_the_password(
    cli: Cli, moto_server: MotoServer
) -> None:
    tables = aws_tables(
        kms_endpoint=moto_server.endpoint_url,
        key_id="unused",
        s3_endpoint=moto_server.endpoint_url,
        bucket="signd-unused",
        dsn=f"postgresql://signd:{TEST_PASSWORD}@127.0.0.1:{free_port()}/signd",
    )
    write_config(cli.home, tables)
    code, report = run(cli)
    assert code == 4
    assert report["error"]["code"] == "dependency_unavailable"
    assert "PostgreSQL" in report["error"]["message"]
    code, text = run(cli, as_json=False)
    assert code == 4
    assert "error dependency_unavailable" in text
    assert TEST_PASSWORD not in text + json.dumps(report)


def test_s3_unreachable_exits_4(cli: Cli) -> None:
    tables = local_tables()
    tables["blobs"] = aws_tables(
        kms_endpoint="",
        key_id="",
        s3_endpoint=f"http://127.0.0.1:{free_port()}",
        bucket="signd-keys",
        dsn="",
        timeout=1.0,
    )["blobs"]
    write_config(cli.home, tables)
    code, report = run(cli)
    assert code == 4
    assert report["error"]["code"] == "dependency_unavailable"
    assert "S3 bucket 'signd-keys': cannot list the blobs" in report["error"]["message"]


@local_only
def test_an_unmounted_blob_folder_exits_4_not_key_loss(stack: Stack, cli: Cli) -> None:
    stack.create(2)
    assert isinstance(stack.blobs, FilesystemBlobStore)
    root = stack.blobs.root
    root.rename(root.with_name("blobs.volume"))  # the volume is not mounted:
    root.mkdir()  # its mount point is an empty folder
    code, report = run(cli)
    assert code == 4
    assert MARKER in report["error"]["message"]


@local_only
def test_the_old_delete_option_is_refused_and_deletes_nothing(stack: Stack, cli: Cli) -> None:
    stack.create(1)
    name = stack.orphan()
    stack.age(name, timedelta(days=30))
    state.close()
    result = cli.runner.invoke(
        app, ["--home", str(cli.home), "storage", "check", "--json", "--delete-orphans"]
    )
    state.close()
    assert result.exit_code == 2  # a usage error: an old cron job fails loudly
    assert "No such option" in result.output
    assert stack.blobs.stat(name) is not None
    assert list(stack.blobs.list_quarantined()) == []


def test_too_small_an_age_is_refused_before_anything_is_read(cli: Cli) -> None:
    code, report = run(cli, "--quarantine-orphans", "--older-than", "599")
    assert code == 4
    assert report["error"]["field"] == "older_than"
    assert not (cli.home / "metadata.db").exists()
    assert not (cli.home / "blobs").exists()
