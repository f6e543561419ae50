"""A host that has been taken over sends the enclave the requests an honest one sends, with
one thing wrong: every one is answered with its result or a specific error, never the
enclave's catch-all for a failure it did not foresee, and the enclave goes on serving."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signd.api import ApiSettings
from signd.api.enclave_gatekeeper import EnclaveGatekeeper
from signd.enclave.client import EnclaveClient
from signd.enclave.protocol import MessageType
from signd.errors import SigndError
from signd.gate import GateRequest, SigningCall, SigningKind
from tests.gate.support import BROAD_TOKEN, TestClient, broad_gate_files, gated_service
from tests.mutations import JUNK, one_thing_wrong

UNFORESEEN = "the enclave failed to handle the request"
JUNK_OR_BYTES = st.one_of(JUNK, st.binary(max_size=80))
BEARER = {"authorization": f"Bearer {BROAD_TOKEN}"}
SERVICE = ApiSettings(allow_blind_signing=True)
CREATE = {"chain": "ethereum", "custody": "enclave"}


class Recording:
    """The enclave client's requests, recorded as the honest host sends them."""

    def __init__(self, client: EnclaveClient) -> None:
        self.client = client
        self.sent: list[tuple[MessageType, dict[str, Any]]] = []
        self._request = client.request

    def __call__(self, message_type: MessageType, body: Any, **options: Any) -> dict[str, Any]:
        self.sent.append((message_type, dict(body)))
        return self._request(message_type, body, **options)


@pytest.fixture(scope="module")
def honest(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[EnclaveClient, TestClient, list[tuple[MessageType, dict[str, Any]]]]]:
    """A gate-only enclave and the requests an honest host sent it: a GATE that
    authenticates, GATEs that sign a hash and a transaction, and the plainer messages."""
    home = tmp_path_factory.mktemp("hostile") / "home"
    with (
        gated_service(home, "enclave", SERVICE, broad_gate_files) as service,
        TestClient(service.app) as http,
    ):
        made = http.post(
            "/v1/keys", json={"chain": "ethereum", "custody": "enclave"}, headers=BEARER
        )
        assert made.status_code == 201, made.text
        key = made.json()["keys"][0]
        gatekeeper = service.gatekeeper
        assert isinstance(gatekeeper, EnclaveGatekeeper)
        client = gatekeeper.client
        recording = Recording(client)
        client.request = recording  # type: ignore[method-assign]
        try:
            for path, body, kind, payload in [
                (
                    "/v1/sign/hash",
                    {"key": key["address"], "hash": "0x" + "11" * 32},
                    SigningKind.HASH,
                    bytes([0x11]) * 32,
                ),
                (
                    "/v1/sign/ethereum/message",
                    {"key": key["address"], "message": "hi"},
                    SigningKind.ETH_MESSAGE,
                    b"hi",
                ),
            ]:
                request = GateRequest("POST", path, json.dumps(body).encode(), BEARER)
                caller = gatekeeper.authenticate(request)
                [signed] = gatekeeper.sign(caller, [SigningCall(kind, key["address"], payload)])
                assert not isinstance(signed, Exception), signed
        finally:
            client.request = recording._request  # type: ignore[method-assign]
        sent = [(t, b) for t, b in recording.sent if t is MessageType.GATE]
        assert len(sent) == 4  # authenticate, then sign, twice
        lines = service.paths.audit_log.read_bytes().splitlines()[-3:]
        sent += [
            (MessageType.HELLO, {"versions": [1, 2]}),
            (MessageType.HEALTH, {}),
            (MessageType.FLUSH_CACHE, {}),
            (MessageType.ATTESTATION, {"nonce": b"\x01" * 16}),
            (MessageType.CREATE_KEYS, {"chain": "ethereum", "count": 1}),
            (
                MessageType.AUDIT_VERIFY,
                {"records": [line.decode() for line in lines], "state": b"", "final": True},
            ),
            (
                MessageType.AUDIT_VERIFY,
                {
                    "records": [line.decode() for line in lines],
                    "state": b"",
                    "final": True,
                    "audit_key": service.paths.sealed_audit_key_file.read_bytes(),
                },
            ),
        ]
        yield client, http, sent
        # The records the enclave sealed for the fuzzed GATEs never reached the log: the next
        # request finds the chain broken and is withheld (503: its records cannot extend the
        # log, nothing was tampered with), the host has the enclave resume the chain, and the
        # one after that is signed.
        body = {"key": key["address"], "hash": "0x" + "22" * 32}
        for _ in range(2):
            response = http.post("/v1/sign/hash", json=body, headers=BEARER)
            if response.status_code == 200:
                break
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "dependency_unavailable", response.text
        assert response.status_code == 200, response.text


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
@given(data=st.data())
def test_each_answer_is_a_result_or_a_foreseen_error(
    honest: tuple[EnclaveClient, TestClient, list[tuple[MessageType, dict[str, Any]]]],
    data: st.DataObject,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, _, sent = honest
    message_type, valid = data.draw(st.sampled_from(sent))
    body = data.draw(one_thing_wrong(valid, JUNK_OR_BYTES))
    if not isinstance(body, dict):  # the client encodes maps only; the enclave gets a map
        body = {"body": body}
    with caplog.at_level(logging.ERROR, logger="signd.enclave.server"):
        failure: SigndError | None = None
        try:
            client.request(message_type, body)
        except SigndError as error:
            failure = error
    assert failure is None or failure.message != UNFORESEEN, (message_type, body)
    assert not [r for r in caplog.records if "request failed" in r.getMessage()]
