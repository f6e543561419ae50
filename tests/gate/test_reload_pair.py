"""Reloading the clients and policy files is all or nothing, with either gate."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.gate.support import BOTH_GATES, Gated, public_text, transaction

pytestmark = BOTH_GATES

SIGN_TX = "/v1/sign/ethereum/transaction"
BAD_CLIENTS = 'version = 1\n[[clients]]\nid = "half"\n'
BAD_POLICY = "version = 1\n[[rules]]\nname = 'broken'\n"


def body(key: dict[str, Any], **options: Any) -> dict[str, Any]:
    return {"key": key["address"], "transaction": transaction(**options)}


def newcomer_entry(key: ed25519.Ed25519PrivateKey) -> str:
    return (
        '\n[[clients]]\nid = "newcomer"\nscopes = ["keys:read"]\nkey_labels = ["*"]\n'
        f'public_key = "{public_text(key)}"\n'
    )


def test_a_good_policy_beside_a_bad_clients_file_is_not_put_in_force(
    gated: Gated, hot_key: dict[str, Any]
) -> None:
    """The in-process gate used to reload each file on its own: the changed policy went into
    force beside the old clients file, a pair never validated together."""
    paths = gated.paths
    good_clients = paths.clients_file.read_text()
    paths.policy_file.write_text(
        paths.policy_file.read_text().replace("chain_ids = [1, 11155111]", "chain_ids = [11155111]")
    )
    paths.clients_file.write_text(BAD_CLIENTS)

    problems = gated.gatekeeper.reload()

    assert len(problems) == 1 and problems[0].startswith("clients: "), problems
    assert gated.signed("POST", SIGN_TX, body(hot_key)).status_code == 200  # chain 1: old policy

    paths.clients_file.write_text(good_clients)
    assert gated.gatekeeper.reload() == []
    assert gated.signed("POST", SIGN_TX, body(hot_key)).status_code == 403  # the new policy


def test_a_good_clients_file_beside_a_bad_policy_is_not_put_in_force(
    gated: Gated, hot_key: dict[str, Any]
) -> None:
    newcomer = ed25519.Ed25519PrivateKey.generate()
    paths = gated.paths
    paths.clients_file.write_text(paths.clients_file.read_text() + newcomer_entry(newcomer))
    paths.policy_file.write_text(BAD_POLICY)

    problems = gated.gatekeeper.reload()

    assert len(problems) == 1 and problems[0].startswith("policy: "), problems
    target = f"/v1/keys/{hot_key['key_id']}"
    unknown = gated.signed("GET", target, as_client="newcomer", key=newcomer)
    assert unknown.status_code == 401, unknown.text


def test_two_bad_files_are_both_named(gated: Gated) -> None:
    gated.paths.clients_file.write_text(BAD_CLIENTS)
    gated.paths.policy_file.write_text(BAD_POLICY)
    reason = "; ".join(gated.gatekeeper.reload())
    assert reason.startswith("clients: ") and "; policy: " in reason
