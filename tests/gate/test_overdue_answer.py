"""One enclave answer overdue: only its request fails. The service's gate, with an enclave
server on a Unix socket whose KMS Decrypt is slow for one cold key: that signing request is
answered 503 after ``[enclave] timeout``, while requests in flight beside it are answered as
usual, and its late answer's audit records still reach the log in their place, so the
requests after it neither wait for them nor fail."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from starlette.testclient import TestClient

from signd.api import ApiSettings
from signd.api.enclave_gatekeeper import EnclaveGatekeeper
from signd.crypto.secret import Secret
from signd.gate import GatePaths
from signd.kms.base import DataKey, KmsClient
from signd.kms.local import LocalKms
from tests.gate.support import (
    POLICY,
    Gated,
    assert_log_verifies,
    clients_toml,
    gated_service,
)

TIMEOUT = 1.0
"""``[enclave] timeout`` of these tests (seconds)."""


class SlowKms(KmsClient):
    """The local KMS, whose next Decrypt calls each first wait the delays queued."""

    kms_type = "local"

    def __init__(self, home: Path) -> None:
        self.inner = LocalKms(home)
        self.delays: deque[float] = deque()
        self.create_delays: deque[float] = deque()
        """Waits of the next GenerateDataKey calls."""

    def generate_data_key(self, *, encryption_context: Mapping[str, str] | None = None) -> DataKey:
        if self.create_delays:
            time.sleep(self.create_delays.popleft())
        return self.inner.generate_data_key(encryption_context=encryption_context)

    def decrypt(
        self, ciphertext: bytes, *, encryption_context: Mapping[str, str] | None = None
    ) -> Secret:
        if self.delays:
            time.sleep(self.delays.popleft())
        return self.inner.decrypt(ciphertext, encryption_context=encryption_context)


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[tuple[Gated, SlowKms]]:
    alice, reader = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    made: list[SlowKms] = []

    def write_files(paths: GatePaths) -> None:
        paths.clients_file.write_text(clients_toml(alice, reader))
        paths.policy_file.write_text(POLICY)

    def kms(home: Path) -> SlowKms:
        made.append(SlowKms(home))
        return made[-1]

    with (
        gated_service(
            tmp_path / "home",
            "enclave",
            ApiSettings(allow_blind_signing=True),
            write_files,
            enclave_options=f"timeout = {TIMEOUT}\n",
            enclave_kms=kms,
        ) as service,
        TestClient(service.app) as client,
    ):
        gated = Gated(client, service.gatekeeper, service.paths, service.signer, alice, reader)
        yield gated, made[0]


def new_key(gated: Gated) -> str:
    body = {"chain": "ethereum", "custody": "enclave", "labels": ["hot"]}
    response = gated.signed("POST", "/v1/keys", body)
    assert response.status_code == 201, response.text
    key_id: str = response.json()["keys"][0]["key_id"]
    return key_id


def sign(gated: Gated, key_id: str, text: str) -> Any:
    body = {"key": key_id, "message": text}
    return gated.signed("POST", "/v1/sign/ethereum/message", body)


def test_only_the_overdue_request_fails(slow: tuple[Gated, SlowKms]) -> None:
    gated, kms = slow
    gatekeeper = gated.gatekeeper
    assert isinstance(gatekeeper, EnclaveGatekeeper)
    cold, other = new_key(gated), new_key(gated)
    gatekeeper.client.flush_cache()  # both keys are unsealed (a KMS Decrypt) on next use
    # The cold key's Decrypt takes 1.5 s: past the timeout, not twice past. The other
    # key's, asked 0.4 s later, takes 0.8 s: its answer comes after the first's deadline.
    kms.delays.extend([1.5 * TIMEOUT, 0.8 * TIMEOUT])
    with ThreadPoolExecutor(max_workers=2) as pool:
        overdue = pool.submit(sign, gated, cold, "slow")
        time.sleep(0.4 * TIMEOUT)
        beside = pool.submit(sign, gated, other, "beside")
        overdue_answer, beside_answer = overdue.result(), beside.result()
    assert overdue_answer.status_code == 503, overdue_answer.text
    assert f"did not answer within {TIMEOUT:g} s" in overdue_answer.text
    assert "signature" not in overdue_answer.text
    assert beside_answer.status_code == 200, beside_answer.text


def test_a_late_answer_keeps_its_records_in_the_chain(slow: tuple[Gated, SlowKms]) -> None:
    """The overdue request's records (sealed when the enclave finished it) are appended when
    its answer comes, so the next request's records follow them at once: no wait for records
    that will never come, no 503 for it, no resume of the chain."""
    gated, kms = slow
    gatekeeper = gated.gatekeeper
    assert isinstance(gatekeeper, EnclaveGatekeeper)
    cold, warm = new_key(gated), new_key(gated)
    gatekeeper.client.flush_cache()
    assert sign(gated, warm, "warm up").status_code == 200
    before = len(gated.records())
    kms.delays.append(1.5 * TIMEOUT)
    assert sign(gated, cold, "slow").status_code == 503
    time.sleep(TIMEOUT)  # the enclave has answered it by now
    started = time.monotonic()
    after = sign(gated, warm, "after")
    assert after.status_code == 200, after.text
    assert time.monotonic() - started < TIMEOUT
    records = [entry.record for entry in gated.records()[before:]]
    assert [(record.key_id, record.decision) for record in records] == [
        (cold, "allowed"),
        (warm, "allowed"),
    ]
    assert_log_verifies(gatekeeper, gated.paths)


def test_a_late_key_creation_keeps_its_records_and_names_its_keys(
    slow: tuple[Gated, SlowKms], caplog: pytest.LogCaptureFixture
) -> None:
    """Key creation goes through the threads' client: the same holds there. The keys the
    enclave made for the request that gave up are named in a warning, and recorded nowhere."""
    gated, kms = slow
    gatekeeper = gated.gatekeeper
    assert isinstance(gatekeeper, EnclaveGatekeeper)
    warm = new_key(gated)
    before = len(gated.records())
    kms.create_delays.append(1.5 * TIMEOUT)
    body = {"chain": "ethereum", "custody": "enclave", "labels": ["hot"]}
    refused = gated.signed("POST", "/v1/keys", body)
    assert refused.status_code == 503, refused.text
    assert f"did not answer within {TIMEOUT:g} s" in refused.text
    time.sleep(TIMEOUT)  # the enclave has answered it by now
    started = time.monotonic()
    after = sign(gated, warm, "after")
    assert after.status_code == 200, after.text
    assert time.monotonic() - started < TIMEOUT
    records = [entry.record for entry in gated.records()[before:]]
    assert [(record.operation, record.decision) for record in records] == [
        ("keys:create", "allowed"),
        ("sign:message", "allowed"),
    ]
    [made] = [line for line in caplog.messages if "were not recorded" in line]
    listed = gated.signed("GET", "/v1/keys?custody=enclave").json()["keys"]
    assert made.rsplit(": ", 1)[1] not in {key["key_id"] for key in listed}
    assert_log_verifies(gatekeeper, gated.paths)


def test_the_connection_stays_up_beside_an_overdue_request(
    slow: tuple[Gated, SlowKms],
) -> None:
    """Requests sent while one is overdue share its connection (none is made again)."""
    gated, kms = slow
    gatekeeper = gated.gatekeeper
    assert isinstance(gatekeeper, EnclaveGatekeeper)
    cold, warm = new_key(gated), new_key(gated)
    gatekeeper.client.flush_cache()
    assert sign(gated, warm, "warm up").status_code == 200
    channel = gatekeeper._channel()
    protocol = channel._protocol
    kms.delays.append(1.5 * TIMEOUT)  # late, but not twice the timeout late
    statuses: list[int] = []
    stop = threading.Event()

    def keep_signing() -> None:
        while not stop.is_set():
            statuses.append(sign(gated, warm, "beside").status_code)

    with ThreadPoolExecutor(max_workers=3) as pool:
        load = [pool.submit(keep_signing) for _ in range(2)]
        overdue = pool.submit(sign, gated, cold, "slow").result()
        time.sleep(TIMEOUT)
        stop.set()
        for worker in load:
            worker.result()
    assert overdue.status_code == 503
    assert statuses and set(statuses) == {200}
    assert channel._protocol is protocol and channel.connected
    assert not protocol.pending  # the late answer came: its id is free again


def test_a_json_rpc_batch_performed_with_an_overdue_answer_is_answered_member_by_member(
    slow: tuple[Gated, SlowKms],
) -> None:
    """A batch of messages is performed while the enclave authenticates it; its answer
    overdue, each member with an id gets the -32006 error in an array (HTTP 200), as
    JSON-RPC 2.0 and ethers.js want a batch answered, not one error object for them all."""
    gated, kms = slow
    gatekeeper = gated.gatekeeper
    assert isinstance(gatekeeper, EnclaveGatekeeper)
    body = {"chain": "ethereum", "custody": "enclave", "labels": ["hot"]}
    cold = gated.signed("POST", "/v1/keys", body).json()["keys"][0]["address"]
    gatekeeper.client.flush_cache()
    kms.delays.append(1.5 * TIMEOUT)
    ids: list[Any] = [0, "b", 2.5]
    batch: list[dict[str, Any]] = [
        {"jsonrpc": "2.0", "id": id_, "method": "personal_sign", "params": ["0x61", cold]}
        for id_ in ids
    ]
    batch.insert(1, {"jsonrpc": "2.0", "method": "personal_sign", "params": ["0x62", cold]})
    response = gated.signed("POST", "/rpc", batch)
    assert response.status_code == 200, response.text
    answers = response.json()
    assert isinstance(answers, list) and [answer["id"] for answer in answers] == ids
    for answer in answers:
        assert "result" not in answer
        assert answer["error"]["code"] == -32006
        assert f"did not answer within {TIMEOUT:g} s" in answer["error"]["message"]
        assert answer["error"]["data"] == {"code": "dependency_unavailable"}
    time.sleep(TIMEOUT)  # the late answer's records reach the log before the fixture ends
