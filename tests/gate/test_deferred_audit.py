"""The service waits for each request's audit records without a thread: the records are
submitted, written in groups, and a result leaves only once its records are durable. A
failed append withholds the result (503) and the chain goes on whole afterwards."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from signd.gate import SigningCall, SigningKind
from tests.gate.support import BOTH_GATES, Gated, first_fsync_failing

pytestmark = BOTH_GATES

MESSAGE = "audited before released"


def sign_message(gated: Gated, key: dict[str, Any]) -> Any:
    return gated.signed(
        "POST", "/v1/sign/ethereum/message", {"key": key["key_id"], "message": MESSAGE}
    )


def test_a_failed_audit_append_withholds_the_signature(
    gated: Gated, hot_key: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert sign_message(gated, hot_key).status_code == 200
    before = len(gated.records())
    with first_fsync_failing(monkeypatch):
        refused = sign_message(gated, hot_key)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "dependency_unavailable"
    assert "signature" not in refused.text

    again = sign_message(gated, hot_key)
    assert again.status_code == 200, again.text
    records = gated.records()
    assert len(records) > before
    for earlier, later in itertools.pairwise(records):
        assert later.prev_hash == earlier.hash  # the log goes on whole after the failure
        assert later.record.seq > earlier.record.seq


def test_a_known_local_key_signs_on_the_event_loop(gated: Gated, hot_key: dict[str, Any]) -> None:
    """In this process's gate, a keystore key whose record and private key are in memory
    signs without a thread hop; the enclave's gate never signs inline (it awaits the
    enclave instead)."""
    call = SigningCall(SigningKind.ETH_MESSAGE, hot_key["key_id"], MESSAGE.encode())
    assert sign_message(gated, hot_key).status_code == 200
    inline = gated.gatekeeper.signs_inline([call])
    assert inline is (hot_key["custody"] == "keystore")
    assert gated.signer.key_is_known(hot_key["key_id"])
