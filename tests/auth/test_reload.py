"""Reloading the clients file: a good file takes effect, a bad one is refused and the old stays."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from signd.auth import ClientsHolder, RequestVerifier, sign_request
from signd.auth.reload import (
    SETTLE_SECONDS,
    UNEXPECTED_FAILURE,
    ReloadHistory,
    ReloadRefusal,
    read_settled,
    reload_together,
)
from signd.errors import AccessDenied, ConfigurationError, ConfigurationRefused
from signd.policy import PolicyHolder
from tests.auth.conftest import NOW, FakeClock, ed25519_text


@pytest.fixture
def path(tmp_path: Path, clients_text: str) -> Path:
    file = tmp_path / "clients.toml"
    file.write_text(clients_text)
    return file


def newcomer_entry(key: ed25519.Ed25519PrivateKey) -> str:
    return (
        '\n[[clients]]\nid = "newcomer"\nscopes = ["sign:hash"]\nkey_labels = ["*"]\n'
        f'public_key = "{ed25519_text(key)}"\n'
    )


def test_good_reload_takes_effect_for_the_verifier(path: Path, clock: FakeClock) -> None:
    holder = ClientsHolder.load(path)
    verifier = RequestVerifier(holder, now=clock)
    key = ed25519.Ed25519PrivateKey.generate()
    headers = sign_request("GET", "/v1/keys", b"", "newcomer", key, now=NOW)
    with pytest.raises(AccessDenied, match="unknown client 'newcomer'"):
        verifier.verify("GET", "/v1/keys", b"", headers)

    path.write_text(path.read_text() + newcomer_entry(key))
    registry = holder.reload()
    assert holder.current is registry
    assert holder.sha256 == registry.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert verifier.verify("GET", "/v1/keys", b"", headers).client_id == "newcomer"
    with pytest.raises(AccessDenied, match="replayed request"):
        verifier.verify("GET", "/v1/keys", b"", headers)


@pytest.mark.parametrize(
    "bad",
    [
        b'[[clients]]\nid = "x"\nscopes = ["sign:all"]\nkey_labels = ["*"]\n',
        b"not = [toml",
        b"\xff",
    ],
    ids=["unknown-scope", "not-toml", "not-utf8"],
)
def test_bad_reload_keeps_the_old_registry(
    path: Path, bad: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    holder = ClientsHolder.load(path)
    before, digest = holder.current, holder.sha256
    path.write_bytes(bad)
    with caplog.at_level(logging.ERROR), pytest.raises(ConfigurationError):
        holder.reload()
    assert holder.current is before
    assert holder.sha256 == digest
    assert "clients refused, keeping sha256 " + digest in caplog.text


def test_missing_file_on_reload_keeps_the_old_registry(path: Path) -> None:
    holder = ClientsHolder.load(path)
    before = holder.current
    path.unlink()
    with pytest.raises(ConfigurationError, match="cannot read the clients file"):
        holder.reload()
    assert holder.current is before


def test_replace_from_bytes_and_no_path(clients_text: str) -> None:
    holder = ClientsHolder(clients_text.encode())
    assert len(holder.current) == 3
    with pytest.raises(ConfigurationError, match="not loaded from a path"):
        holder.reload()
    with pytest.raises(ConfigurationError):
        holder.replace(b"version = 9\n")
    assert len(holder.current) == 3
    holder.replace(b"")
    assert len(holder.current) == 0


def test_initial_load_of_a_bad_file_fails(tmp_path: Path) -> None:
    bad = tmp_path / "clients.toml"
    bad.write_text("version = 2\n")
    with pytest.raises(ConfigurationError, match="only version = 1"):
        ClientsHolder.load(bad)


def test_a_file_being_written_in_place_is_not_taken_half_written(tmp_path: Path) -> None:
    """A reload that came while the file was written in pieces took the first piece when it
    was valid TOML: here, the rule cut before its limit (so looser than the whole file)."""
    whole = (
        'version = 1\n\n[[rules]]\nname = "tx"\nclients = ["*"]\nkey_labels = ["*"]\n'
        'operations = ["sign:transaction"]\nchains = ["ethereum"]\n'
        'max_value_per_tx = "1000"\n'
    )
    cut = whole.index("max_value_per_tx")
    path = tmp_path / "policy.toml"
    path.write_text(whole.replace('"1000"', '"1"'))
    holder = PolicyHolder.load(path)
    path.write_text(whole[:cut])  # truncated and half rewritten, as `cat > policy.toml` does
    rest = threading.Timer(SETTLE_SECONDS / 2, lambda: path.write_text(whole))
    rest.start()
    try:
        policy = holder.reload()
    finally:
        rest.join()
    rule = policy.rule("tx")
    assert rule is not None and rule.max_value_per_tx == 1000


def test_a_file_that_keeps_changing_is_refused(tmp_path: Path, clients_text: str) -> None:
    path = tmp_path / "clients.toml"
    path.write_text(clients_text)
    holder = ClientsHolder.load(path)
    before = holder.sha256
    writing = threading.Event()

    def keep_writing() -> None:
        count = 0
        while not writing.is_set():
            count += 1
            path.write_text(clients_text + f"# {count}\n")
            time.sleep(SETTLE_SECONDS / 4)

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        with pytest.raises(ConfigurationError, match="kept changing while it was read"):
            holder.reload()
    finally:
        writing.set()
        writer.join()
    assert holder.sha256 == before


@pytest.mark.parametrize("kind", ["clients", "policy"])
def test_an_unreadable_file_is_refused_by_name(tmp_path: Path, kind: str) -> None:
    """The enclave's host wrapped read_settled only to put the file's name in front."""
    missing = tmp_path / f"{kind}.toml"
    with pytest.raises(ConfigurationRefused) as refused:
        read_settled(kind, missing)
    assert refused.value.files == (kind,)
    assert refused.value.message == f"{kind}: cannot read the {kind} file {missing}: " + (
        "No such file or directory"
    )


# the clients and policy files together

POLICY_TEXT = (
    'version = 1\n\n[[rules]]\nname = "tx"\nclients = ["*"]\nkey_labels = ["*"]\n'
    'operations = ["sign:transaction"]\nchains = ["ethereum"]\n'
)


@pytest.fixture
def pair(tmp_path: Path, clients_text: str) -> tuple[ClientsHolder, PolicyHolder]:
    (tmp_path / "clients.toml").write_text(clients_text)
    (tmp_path / "policy.toml").write_text(POLICY_TEXT)
    return ClientsHolder.load(tmp_path / "clients.toml"), PolicyHolder.load(
        tmp_path / "policy.toml"
    )


def test_two_good_files_are_put_in_force_together(
    pair: tuple[ClientsHolder, PolicyHolder],
) -> None:
    clients, policy = pair
    assert clients.path is not None and policy.path is not None
    newcomer = ed25519.Ed25519PrivateKey.generate()
    clients.path.write_text(clients.path.read_text() + newcomer_entry(newcomer))
    policy.path.write_text(POLICY_TEXT.replace('"tx"', '"tx-renamed"'))
    assert reload_together([clients, policy]) is None
    assert "newcomer" in clients.current
    assert policy.current.rule("tx-renamed") is not None
    assert policy.sha256 == hashlib.sha256(policy.path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("bad_file", "bad", "reason"),
    [
        ("clients", b'version = 1\n[[clients]]\nid = "x"\n', "clients: client 'x'"),
        ("clients", None, "clients: cannot read the clients file"),
        ("policy", b"version = 1\n[[rules]]\nname = 'broken'\n", "policy: policy rule"),
        ("policy", None, "policy: cannot read the policy file"),
    ],
    ids=["bad-clients", "missing-clients", "bad-policy", "missing-policy"],
)
def test_one_bad_file_keeps_the_other_good_one_out_too(
    pair: tuple[ClientsHolder, PolicyHolder],
    bad_file: str,
    bad: bytes | None,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each file used to be reloaded on its own: a good changed policy went into force
    beside the old clients file (a pair never validated together) when the clients file
    was bad, and the other way round."""
    clients, policy = pair
    assert clients.path is not None and policy.path is not None
    before = (clients.current, clients.sha256, policy.current, policy.sha256)
    newcomer = ed25519.Ed25519PrivateKey.generate()
    clients.path.write_text(clients.path.read_text() + newcomer_entry(newcomer))
    policy.path.write_text(POLICY_TEXT.replace('"tx"', '"tx-renamed"'))
    broken = clients.path if bad_file == "clients" else policy.path
    if bad is None:
        broken.unlink()
    else:
        broken.write_bytes(bad)
    with caplog.at_level(logging.ERROR):
        refusal = reload_together([clients, policy])
    assert refusal is not None and refusal.files == (bad_file,), refusal
    assert refusal.reason.startswith(reason) and "; " not in refusal.reason
    assert (clients.current, clients.sha256, policy.current, policy.sha256) == before
    assert "newcomer" not in clients.current and policy.current.rule("tx") is not None
    assert "reload refused, none of the files taken" in caplog.text
    assert f"policy sha256 {before[3]}" in caplog.text


def test_both_bad_files_are_each_named(pair: tuple[ClientsHolder, PolicyHolder]) -> None:
    clients, policy = pair
    assert clients.path is not None and policy.path is not None
    clients.path.write_text("not = [toml")
    policy.path.write_text("version = 2\n")
    refusal = reload_together([clients, policy])
    assert refusal is not None and refusal.files == ("clients", "policy"), refusal
    assert [problem.split(":")[0] for problem in refusal.reason.split("; ")] == list(refusal.files)


def test_the_reload_history_says_how_the_last_reload_went(clock: FakeClock) -> None:
    history = ReloadHistory(now=clock)
    started = history.status("c" * 64, "p" * 64)
    assert (started.state, started.at, started.refusal) == ("loaded", clock(), None)
    assert started.counts == {"reloaded": 0, "refused": 0}
    assert started.to_dict() == {
        "status": "loaded",
        "at": clock(),
        "in_force": {"clients_sha256": "c" * 64, "policy_sha256": "p" * 64},
    }

    clock.now += 5
    refusal = ReloadRefusal(("clients", "policy"), "clients: not valid TOML; policy: version")
    assert history.run(lambda: refusal) == refusal
    refused = history.status("c" * 64, None)
    assert refused.to_dict() == {
        "status": "refused",
        "at": clock(),
        "reason": "clients: refused; policy: refused (the service log says why)",
        "in_force": {"clients_sha256": "c" * 64},
    }
    clock.now += 5
    assert history.run(lambda: None) is None
    reloaded = history.status("d" * 64, "q" * 64)
    assert (reloaded.state, reloaded.at, reloaded.refusal) == ("reloaded", clock(), None)
    assert reloaded.counts == {"reloaded": 1, "refused": 1}


def test_readyz_names_the_files_the_refusal_names_whatever_its_reason_says() -> None:
    """Which files were refused was read out of the reason: a clients problem quoting
    ``; policy: `` named the policy file too, and one not starting with its file, none."""
    history = ReloadHistory()
    history.run(lambda: ReloadRefusal(("clients",), "clients: unknown scopes ['x; policy: y']"))
    public = history.status(None, None).to_dict()["reason"]
    assert public == "clients: refused (the service log says why)"
    history.run(lambda: ReloadRefusal(("policy",), "cannot read the policy file /p"))
    public = history.status(None, None).to_dict()["reason"]
    assert public == "policy: refused (the service log says why)"


def test_a_reload_that_raises_is_recorded_as_refused_and_raised() -> None:
    history = ReloadHistory()

    def failing() -> ReloadRefusal | None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        history.run(failing)
    status = history.status(None, None)
    assert status.state == "refused" and status.refusal == ReloadRefusal((), UNEXPECTED_FAILURE)
    assert "boom" not in status.to_dict()["reason"]
    assert status.counts["refused"] == 1
