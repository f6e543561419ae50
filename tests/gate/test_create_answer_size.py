"""Key creations as large as the API allows, through the enclave's gate: the enclave's answer
carries every key it made and its sealed audit record, more than a request-sized frame."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import coincurve

from signd.api import ApiSettings
from signd.audit import SealedAuditRecord
from signd.custody.base import MAX_LABEL_LENGTH, MAX_LABELS
from tests.gate.support import (
    BROAD_TOKEN,
    GatedService,
    TestClient,
    assert_log_verifies,
    broad_gate_files,
    gated_service,
)

AUTH = {"authorization": f"Bearer {BROAD_TOKEN}"}
LONGEST_LABELS = [f"{index:02d}" + "\U0001f511" * (MAX_LABEL_LENGTH - 2) for index in range(16)]
"""Labels at their limits: as many as a key may carry, as long as one may be, each character
four bytes in UTF-8."""


@contextmanager
def enclave_gated(home: Path, settings: ApiSettings) -> Iterator[tuple[GatedService, TestClient]]:
    with (
        gated_service(home, "enclave", settings, broad_gate_files) as gated,
        TestClient(gated.app) as client,
    ):
        yield gated, client
        assert assert_log_verifies(gated.gatekeeper, gated.paths) > 0


def blob_files(gated: GatedService) -> int:
    return sum(1 for path in (gated.paths.audit_log.parent / "blobs").rglob("*") if path.is_file())


def test_the_most_keys_a_request_may_ask_for_are_made_with_labels_at_their_limits(
    tmp_path: Path,
) -> None:
    assert len(LONGEST_LABELS) == MAX_LABELS
    settings = ApiSettings(allow_blind_signing=True)
    count = settings.max_keys_per_request
    with enclave_gated(tmp_path / "home", settings) as (gated, client):
        body = {"chain": "ethereum", "custody": "enclave", "count": count}
        made = client.post("/v1/keys", json=body | {"labels": LONGEST_LABELS}, headers=AUTH)
        assert made.status_code == 201, made.text[:500]
        keys: list[dict[str, Any]] = made.json()["keys"]
        assert len({key["address"] for key in keys}) == count
        assert all(key["labels"] == LONGEST_LABELS for key in keys)
        listed = gated.signer.list_keys(custody="enclave", label=LONGEST_LABELS[-1], limit=1000)
        assert {key.address for key in listed.keys} == {key["address"] for key in keys}
        for key in (keys[0], keys[-1]):
            digest = bytes(range(32))
            signed = client.post(
                "/v1/sign/hash",
                json={"key": key["address"], "hash": "0x" + digest.hex()},
                headers=AUTH,
            )
            assert signed.status_code == 200, signed.text
            answer = signed.json()
            signature = bytes.fromhex(answer["signature"][2:])[:64]
            recovered = coincurve.PublicKey.from_signature_and_message(
                signature + bytes([answer["recovery_id"]]), digest, hasher=None
            )
            assert "0x" + recovered.format(compressed=True).hex() == key["public_key"]


def test_a_creation_whose_answer_would_not_fit_is_refused_before_any_key_is_made(
    tmp_path: Path,
) -> None:
    """With ``max_keys_per_request`` raised past what one answer of the enclave holds, a
    creation of that many keys is a 400 naming ``count``, audited as refused, and no key is
    made (no blob written, none recorded); a smaller one goes through."""
    settings = ApiSettings(max_keys_per_request=5000)
    with enclave_gated(tmp_path / "home", settings) as (gated, client):
        blobs = blob_files(gated)
        body = {"chain": "ethereum", "custody": "enclave", "labels": LONGEST_LABELS}
        refused = client.post("/v1/keys", json=body | {"count": 5000}, headers=AUTH)
        assert refused.status_code == 400, refused.text[:500]
        error = refused.json()["error"]
        assert (error["code"], error.get("field")) == ("invalid_field", "count")
        assert "in several requests" in error["message"]
        assert blob_files(gated) == blobs
        last = SealedAuditRecord.from_json(gated.paths.audit_log.read_bytes().splitlines()[-1])
        assert (last.record.operation, last.record.decision) == ("keys:create", "refused")
        assert gated.signer.list_keys(custody="enclave", limit=10).keys == []
        made = client.post("/v1/keys", json=body | {"count": 10}, headers=AUTH)
        assert made.status_code == 201, made.text[:500]
