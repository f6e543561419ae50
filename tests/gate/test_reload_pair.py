"""Reloading the clients and policy files is all or nothing, with either gate, and a refused
reload shows in ``/readyz`` (which stays ready: the files in force serve) and the metrics."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.gate.support import BOTH_GATES, Gated, public_text, transaction

pytestmark = BOTH_GATES

SIGN_TX = "/v1/sign/ethereum/transaction"
BAD_CLIENTS = 'version = 1\n[[clients]]\nid = "half"\n'
BAD_POLICY = "version = 1\n[[rules]]\nname = 'broken'\n"


def body(key: dict[str, Any], **options: Any) -> dict[str, Any]:
    return {"key": key["address"], "transaction": transaction(**options)}


def sha256_of(path: Any) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def newcomer_entry(key: ed25519.Ed25519PrivateKey) -> str:
    return (
        '\n[[clients]]\nid = "newcomer"\nscopes = ["keys:read"]\nkey_labels = ["*"]\n'
        f'public_key = "{public_text(key)}"\n'
    )


def readyz(gated: Gated) -> dict[str, Any]:
    response = gated.client.get("/readyz")
    assert response.status_code == 200, response.text  # the files in force still serve
    answer: dict[str, Any] = response.json()
    return answer


def refused_reloads(gated: Gated) -> str:
    text: str = gated.client.get("/metrics").text
    return next(
        line.rsplit(" ", 1)[1]
        for line in text.splitlines()
        if line.startswith('signd_config_reloads_total{outcome="refused"}')
    )


def test_a_good_policy_beside_a_bad_clients_file_is_not_put_in_force(
    gated: Gated, hot_key: dict[str, Any]
) -> None:
    """The in-process gate used to reload each file on its own: the changed policy went into
    force beside the old clients file, a pair never validated together."""
    paths = gated.paths
    in_force = {"clients_sha256": sha256_of(paths.clients_file)}
    in_force["policy_sha256"] = sha256_of(paths.policy_file)
    good_clients = paths.clients_file.read_text()
    paths.policy_file.write_text(
        paths.policy_file.read_text().replace("chain_ids = [1, 11155111]", "chain_ids = [11155111]")
    )
    paths.clients_file.write_text(BAD_CLIENTS)
    before = time.time()

    refusal = gated.gatekeeper.reload()

    assert refusal is not None and refusal.files == ("clients",), refusal
    assert refusal.reason.startswith("clients: ")
    assert gated.signed("POST", SIGN_TX, body(hot_key)).status_code == 200  # chain 1: old policy
    reload = readyz(gated)["reload"]
    assert reload["status"] == "refused"
    assert "half" in refusal.reason  # the log and reload() say why; /readyz is public
    assert reload["reason"] == "clients: refused (the service log says why)"
    assert before <= reload["at"] <= time.time()
    assert reload["in_force"] == in_force
    assert refused_reloads(gated) == "1"

    paths.clients_file.write_text(good_clients)
    assert gated.gatekeeper.reload() is None
    assert gated.signed("POST", SIGN_TX, body(hot_key)).status_code == 403  # the new policy
    reload = readyz(gated)["reload"]
    assert reload["status"] == "reloaded" and "reason" not in reload
    assert reload["in_force"]["policy_sha256"] == sha256_of(paths.policy_file)
    assert refused_reloads(gated) == "1"


def test_a_good_clients_file_beside_a_bad_policy_is_not_put_in_force(
    gated: Gated, hot_key: dict[str, Any]
) -> None:
    newcomer = ed25519.Ed25519PrivateKey.generate()
    paths = gated.paths
    clients_sha256 = sha256_of(paths.clients_file)
    paths.clients_file.write_text(paths.clients_file.read_text() + newcomer_entry(newcomer))
    paths.policy_file.write_text(BAD_POLICY)

    refusal = gated.gatekeeper.reload()

    assert refusal is not None and refusal.files == ("policy",), refusal
    target = f"/v1/keys/{hot_key['key_id']}"
    unknown = gated.signed("GET", target, as_client="newcomer", key=newcomer)
    assert unknown.status_code == 401, unknown.text
    assert readyz(gated)["reload"]["in_force"]["clients_sha256"] == clients_sha256
    assert gated.gatekeeper.reload_status().counts == {"reloaded": 0, "refused": 1}


def test_two_bad_files_are_both_named(gated: Gated) -> None:
    gated.paths.clients_file.write_text(BAD_CLIENTS)
    gated.paths.policy_file.write_text(BAD_POLICY)
    refusal = gated.gatekeeper.reload()
    assert refusal is not None and refusal.files == ("clients", "policy"), refusal
    assert refusal.reason.startswith("clients: ") and "; policy: " in refusal.reason
    public = "clients: refused; policy: refused (the service log says why)"
    assert readyz(gated)["reload"]["reason"] == public


def test_an_unreadable_file_is_refused_alike_by_either_gate(gated: Gated) -> None:
    gated.paths.policy_file.unlink()
    refusal = gated.gatekeeper.reload()
    assert refusal is not None and refusal.files == ("policy",), refusal
    assert refusal.reason == (
        f"policy: cannot read the policy file {gated.paths.policy_file}: No such file or directory"
    )
    assert readyz(gated)["reload"]["reason"] == "policy: refused (the service log says why)"


def test_a_clients_problem_quoting_a_policy_problem_names_the_clients_file_only(
    gated: Gated,
) -> None:
    """The files refused were read back out of the problems' text: a clients file whose
    problem quoted ``; policy: `` (here an unknown scope) named the policy file too."""
    gated.paths.clients_file.write_text(
        gated.paths.clients_file.read_text().replace('"keys:read"', '"x; policy: y"', 1)
    )
    refusal = gated.gatekeeper.reload()
    reason = readyz(gated)["reload"]["reason"]
    assert reason == "clients: refused (the service log says why)"
    assert refusal is not None and refusal.files == ("clients",), refusal
    assert "; policy: y" in refusal.reason  # the log still says why


def test_before_any_reload_readyz_shows_the_files_loaded(gated: Gated) -> None:
    reload = readyz(gated)["reload"]
    assert reload["status"] == "loaded" and "reason" not in reload
    assert reload["in_force"] == {
        "clients_sha256": sha256_of(gated.paths.clients_file),
        "policy_sha256": sha256_of(gated.paths.policy_file),
    }
    assert refused_reloads(gated) == "0"
