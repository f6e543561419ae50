"""A client's quota of live nonces, end to end with both gates: the ``[api]`` settings reach
the verifier (in this process, or in the enclave through GATE_CONFIGURE), a client at its
quota is refused and audited like any other failed authentication, and other clients go on."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

from signd.api import ApiSettings
from signd.api.enclave_gatekeeper import EnclaveGatekeeper
from signd.errors import ConfigurationError, SigndError
from tests.gate.support import BOTH_GATES, assert_log_verifies, open_gated

QUOTA = 3


def quota_settings() -> ApiSettings:
    return ApiSettings(nonce_capacity=50, nonce_quota=QUOTA)


@BOTH_GATES
def test_a_client_at_its_quota_is_refused_and_audited_while_others_pass(
    tmp_path: Path, gate_mode: str
) -> None:
    with open_gated(tmp_path / "home", gate_mode, quota_settings()) as gated:
        for _ in range(QUOTA):
            response = gated.signed("GET", "/v1/keys", as_client="reader")
            assert response.status_code == 200, response.text
        before = len(gated.records())
        refused = gated.signed("GET", "/v1/keys", as_client="reader")
        assert refused.status_code == 401
        error = refused.json()["error"]
        assert error["code"] == "unauthenticated"
        assert "'reader' has too many requests in the time window" in error["message"]
        [record] = [asdict(r.record) for r in gated.records()[before:]]
        assert (record["operation"], record["decision"]) == ("authenticate", "refused")
        assert "too many requests" in record["reason"]

        other = gated.signed("GET", "/v1/keys", as_client="alice")
        assert other.status_code == 200, other.text
        rpc = gated.signed(
            "POST",
            "/rpc",
            {"jsonrpc": "2.0", "id": 1, "method": "eth_accounts"},
            as_client="reader",
        )
        assert rpc.status_code == 401
        assert rpc.json()["error"]["data"]["code"] == "unauthenticated"
        assert_log_verifies(gated.gatekeeper, gated.paths)


@BOTH_GATES
def test_a_replay_is_still_refused_as_one(tmp_path: Path, gate_mode: str) -> None:
    with open_gated(tmp_path / "home", gate_mode, quota_settings()) as gated:
        first = gated.signed("GET", "/v1/keys", as_client="reader")
        assert first.status_code == 200, first.text
        replayed = gated.client.get("/v1/keys", headers=dict(first.request.headers))
        assert replayed.status_code == 401
        assert "replayed request" in replayed.json()["error"]["message"]


def test_the_enclave_takes_a_new_quota_when_configured_again(tmp_path: Path) -> None:
    with open_gated(tmp_path / "home", "enclave", quota_settings()) as gated:
        for _ in range(QUOTA):
            assert gated.signed("GET", "/v1/keys", as_client="reader").status_code == 200
        assert gated.signed("GET", "/v1/keys", as_client="reader").status_code == 401
        gatekeeper = gated.gatekeeper
        assert isinstance(gatekeeper, EnclaveGatekeeper)
        gatekeeper.limits = replace(gatekeeper.limits, nonce_quota=QUOTA + 1)
        gatekeeper.configure(reread=False)
        assert gated.signed("GET", "/v1/keys", as_client="reader").status_code == 200
        assert gated.signed("GET", "/v1/keys", as_client="reader").status_code == 401

        gatekeeper.limits = replace(gatekeeper.limits, nonce_quota=51)  # over the capacity
        with pytest.raises(SigndError, match=r"nonce_quota must be an integer in 1\.\.50"):
            gatekeeper.configure(reread=False)
        assert gated.signed("GET", "/v1/keys", as_client="reader").status_code == 401


def test_the_quota_defaults_to_a_quarter_of_the_capacity() -> None:
    assert ApiSettings().limits().nonce_quota == 250_000
    limits = ApiSettings.from_mapping({"nonce_capacity": 2000}).limits()
    assert (limits.nonce_capacity, limits.nonce_quota) == (2000, 500)
    assert ApiSettings(nonce_capacity=2000, nonce_quota=2000).limits().nonce_quota == 2000


@pytest.mark.parametrize(
    "table",
    [
        {"nonce_capacity": 0},
        {"nonce_capacity": True},
        {"nonce_capacity": 10**9},
        {"nonce_quota": 0},
        {"nonce_quota": "10"},
        {"nonce_capacity": 10, "nonce_quota": 11},
    ],
)
def test_nonce_settings_out_of_range_stop_the_start(table: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError) as raised:
        ApiSettings.from_mapping(table)
    assert "api.nonce_" in raised.value.message
