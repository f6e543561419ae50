"""With the enclave's gate, a REST signing request is authenticated and performed in one
round trip to the enclave (its calls then handed out as the API asks for them), unless the
service could still refuse it after authentication (a per-client rate limit)."""

from __future__ import annotations

import functools
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from starlette.exceptions import StarletteDeprecationWarning

from signd.api import ApiSettings
from signd.custody.enclave import EnclaveBackend
from signd.enclave import signer as enclave_signer
from signd.enclave.cache import UnsealedKeyCache
from signd.enclave.channel import Connect, EnclaveChannel
from signd.enclave.client import EnclaveClient
from signd.enclave.protocol import Frame, MessageType
from signd.enclave.server import EnclaveApp
from signd.kms.local import LocalKms
from signd.storage.blobs import FilesystemBlobStore
from tests.gate.support import GATE_MODES, Gated, open_gated

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)

pytestmark = pytest.mark.parametrize("gate_mode", [GATE_MODES[1]], indirect=True)


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Counter[MessageType]:
    """The GATE (and other) messages the host sends, by either way to the enclave."""
    counts: Counter[MessageType] = Counter()
    through_channel = EnclaveChannel.request
    through_client = EnclaveClient.request

    async def channel_request(
        self: EnclaveChannel,
        message_type: MessageType,
        body: Mapping[str, Any],
        connect: Connect,
        **options: Any,
    ) -> dict[str, Any]:
        counts[message_type] += 1
        return await through_channel(self, message_type, body, connect, **options)

    def client_request(
        self: EnclaveClient, message_type: MessageType, body: Mapping[str, Any], **options: Any
    ) -> dict[str, Any]:
        counts[message_type] += 1
        return through_client(self, message_type, body, **options)

    monkeypatch.setattr(EnclaveChannel, "request", channel_request)
    monkeypatch.setattr(EnclaveClient, "request", client_request)
    return counts


def message(key: Mapping[str, Any], text: str) -> dict[str, Any]:
    return {"key": key["key_id"], "message": text}


def test_a_signing_request_is_one_round_trip(
    gated: Gated, hot_key: dict[str, Any], sent: Counter[MessageType]
) -> None:
    response = gated.signed("POST", "/v1/sign/ethereum/message", message(hot_key, "one trip"))
    assert response.status_code == 200, response.text
    assert sent[MessageType.GATE] == 1
    assert gated.last()["decision"] == "allowed"
    sent.clear()
    created = gated.signed(
        "POST", "/v1/keys", {"chain": "ethereum", "custody": "enclave", "labels": ["hot"]}
    )
    assert created.status_code == 201, created.text
    assert sent[MessageType.GATE] == 2  # keys: authenticate, then perform


def test_a_batch_is_one_round_trip(
    gated: Gated, hot_key: dict[str, Any], sent: Counter[MessageType]
) -> None:
    requests = [{"type": "ethereum/message"} | message(hot_key, f"item {n}") for n in range(25)]
    requests.append({"type": "ethereum/message"} | message(hot_key, "item 3"))  # asked twice
    response = gated.signed("POST", "/v1/sign/batch", {"requests": requests})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 26 and all("signature" in result for result in results)
    assert results[25] == results[3]
    assert len({result["signature"] for result in results}) == 25
    assert sent[MessageType.GATE] == 1


def test_a_refused_signing_request_is_one_round_trip_and_audited(
    gated: Gated, hot_key: dict[str, Any], sent: Counter[MessageType]
) -> None:
    refused = gated.signed(
        "POST", "/v1/sign/ethereum/message", message(hot_key, "x"), as_client="reader"
    )
    assert refused.status_code == 403, refused.text
    assert sent[MessageType.GATE] == 1
    assert gated.last()["decision"] == "refused"


def test_unauthenticated_signing_is_refused_in_the_same_round_trip(
    gated: Gated, hot_key: dict[str, Any], sent: Counter[MessageType]
) -> None:
    response = gated.client.post(
        "/v1/sign/ethereum/message",
        json=message(hot_key, "no credentials"),
        headers={"authorization": "Bearer not-a-token"},
    )
    assert response.status_code == 401, response.text
    assert sent[MessageType.GATE] == 1
    assert gated.last()["operation"] == "authenticate"


@pytest.fixture
def without_blind_signing(tmp_path: Path, gate_mode: str) -> Iterator[Gated]:
    with open_gated(tmp_path / "off", gate_mode, ApiSettings(allow_blind_signing=False)) as gated:
        yield gated


def test_blind_signing_switched_off_is_refused_by_the_gate_in_the_same_round_trip(
    without_blind_signing: Gated, sent: Counter[MessageType]
) -> None:
    """The switch is the gate's: the enclave refuses the hash request while authenticating
    it, in one round trip, and seals the refusal (no signature is made)."""
    gated = without_blind_signing
    made = gated.signed(
        "POST", "/v1/keys", {"chain": "ethereum", "custody": "enclave", "labels": ["hot"]}
    )
    key = made.json()["keys"][0]
    before = len(gated.records())
    sent.clear()
    response = gated.signed(
        "POST", "/v1/sign/hash", {"key": key["key_id"], "hash": "0x" + "11" * 32}
    )
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "blind_signing_disabled"
    assert sent[MessageType.GATE] == 1
    [record] = [sealed.record for sealed in gated.records()[before:]]
    assert (record.operation, record.decision) == ("sign:hash", "refused")  # before the key
    assert "blind signing" in record.reason


def test_the_enclave_answers_from_memory_on_the_connection_thread(
    gated: Gated, hot_key: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GATE that needs no KMS, storage or HSM call is answered by the connection's own
    thread; key creation and keys not unsealed in memory go to the worker pool."""
    decisions: list[tuple[str, bool]] = []
    answers_at_once = EnclaveApp.answers_at_once

    def recording(self: EnclaveApp, frame: Frame) -> bool:
        decided = answers_at_once(self, frame)
        if frame.message_type is MessageType.GATE:
            decisions.append((frame.body["request"]["target"], decided))
        return decided

    monkeypatch.setattr(EnclaveApp, "answers_at_once", recording)
    signing = "/v1/sign/ethereum/message"
    assert gated.signed("POST", signing, message(hot_key, "warm")).status_code == 200
    assert gated.signed("POST", signing, message(hot_key, "again")).status_code == 200
    assert decisions[-1] == (signing, True)  # unsealed by now: answered at once
    backend = gated.signer.backend("enclave")
    assert isinstance(backend, EnclaveBackend)
    backend.client.flush_cache()
    decisions.clear()
    assert gated.signed("POST", signing, message(hot_key, "cold")).status_code == 200
    assert decisions == [(signing, False)]  # its blob must be opened: the pool does it
    created = gated.signed(
        "POST", "/v1/keys", {"chain": "ethereum", "custody": "enclave", "labels": ["hot"]}
    )
    assert created.status_code == 201
    assert decisions[-1] == ("/v1/keys", False)


@pytest.fixture
def two_use_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """The enclave (started by ``gated`` after this) keeps an unsealed key for 2 uses."""
    monkeypatch.setattr(
        enclave_signer, "UnsealedKeyCache", functools.partial(UnsealedKeyCache, max_uses=2)
    )


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> list[int]:
    """Count the calls of method ``name`` of class ``owner`` from here on (in a list)."""
    counted = [0]
    method = getattr(owner, name)

    def counting(self: object, *args: Any, **kwargs: Any) -> Any:
        counted[0] += 1
        return method(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return counted


@pytest.fixture
def decrypts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many KMS Decrypts the enclave makes from here on."""
    return _count_calls(monkeypatch, LocalKms, "decrypt")


@pytest.fixture
def blob_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many ranged blob reads the enclave makes from here on."""
    return _count_calls(monkeypatch, FilesystemBlobStore, "get_range")


def flush_unsealed(gated: Gated) -> None:
    """Make the enclave forget every unsealed key."""
    backend = gated.signer.backend("enclave")
    assert isinstance(backend, EnclaveBackend)
    backend.client.flush_cache()


def test_a_gated_signature_counts_one_use_of_the_unsealed_key(
    two_use_cache: None, gated: Gated, hot_key: dict[str, Any], decrypts: list[int]
) -> None:
    """Proving a key's labels and signing with it share one unseal: with 2 uses per entry,
    4 signatures open the key twice (4 times if the proof and the signature each used it)."""
    flush_unsealed(gated)
    for text in ("one", "two", "three", "four"):
        signing = gated.signed("POST", "/v1/sign/ethereum/message", message(hot_key, text))
        assert signing.status_code == 200, signing.text
    assert decrypts == [2]


def test_a_batch_over_keys_created_together_unseals_them_with_one_decrypt_and_read(
    gated: Gated, decrypts: list[int], blob_reads: list[int]
) -> None:
    """Sweeping cold deposit addresses: the batch's keys share a data key and a blob, which
    the enclave asks KMS and the store for once in the gate call, not once per key."""
    body = {"chain": "ethereum", "custody": "enclave", "labels": ["hot"], "count": 12}
    created = gated.signed("POST", "/v1/keys", body)
    assert created.status_code == 201, created.text
    keys = created.json()["keys"]
    flush_unsealed(gated)
    decrypts[0] = 0  # creating checked its data key with a Decrypt
    blob_reads[0] = 0
    requests = [{"type": "ethereum/message"} | message(key, "sweep") for key in keys]
    response = gated.signed("POST", "/v1/sign/batch", {"requests": requests})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    signers = [
        Account.recover_message(encode_defunct(text="sweep"), signature=result["signature"])
        for result in results
    ]
    assert signers == [key["address"] for key in keys]
    assert (decrypts, blob_reads) == ([1], [1])
    alone = gated.signed("POST", "/v1/sign/ethereum/message", message(keys[0], "again"))
    assert alone.status_code == 200, alone.text
    assert (decrypts, blob_reads) == ([1], [1])  # still unsealed
