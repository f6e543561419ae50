"""Strict parsing of the COSE_Sign1 envelope and the attestation document."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from cryptography import x509

from signd.attestation.document import (
    MAX_DOCUMENT_SIZE,
    AttestationDocument,
    CoseSign1,
)
from signd.errors import InvalidField
from tests.attestation.conftest import SAMPLE_IDS, SAMPLES, sample_bytes

GA_SAMPLE = SAMPLES[0]


def _hex_or_none(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


def _rfc4514(der: bytes) -> str:
    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_samples_parse_to_the_decoded_fields(sample: dict[str, Any]) -> None:
    raw = sample_bytes(sample)
    assert len(raw) == sample["size_bytes"]
    envelope = CoseSign1.decode(raw)
    assert envelope.protected.hex() == sample["protected_header_hex"]
    document = AttestationDocument.decode(envelope.payload)

    assert document.module_id == sample["module_id"]
    assert document.digest == sample["digest"]
    assert document.timestamp_ms == sample["timestamp_ms"]
    assert document.timestamp.isoformat() == sample["timestamp_utc"]
    assert {str(i): pcr.hex() for i, pcr in document.pcrs.items()} == sample["pcrs"]
    assert _hex_or_none(document.public_key) == sample["public_key_hex"]
    assert _hex_or_none(document.user_data) == sample["user_data_hex"]
    assert _hex_or_none(document.nonce) == sample["nonce_hex"]
    assert len(document.cabundle) == sample["cabundle_length"]
    assert [_rfc4514(der) for der in document.cabundle] == sample["cabundle_subjects"]
    assert _rfc4514(document.certificate) == sample["leaf_certificate"]["subject"]


@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_encoding_reproduces_the_nsm_bytes(sample: dict[str, Any]) -> None:
    raw = sample_bytes(sample)
    envelope = CoseSign1.decode(raw)
    assert envelope.encode() == raw
    assert AttestationDocument.decode(envelope.payload).encode() == envelope.payload


def test_tagged_cose_sign1_is_accepted() -> None:
    raw = sample_bytes(GA_SAMPLE)
    tagged = cbor2.dumps(cbor2.CBORTag(18, cbor2.loads(raw)))
    assert CoseSign1.decode(tagged) == CoseSign1.decode(raw)


def test_pcrs_are_read_only() -> None:
    document = AttestationDocument.decode(CoseSign1.decode(sample_bytes(GA_SAMPLE)).payload)
    with pytest.raises(TypeError):
        document.pcrs[0] = b"\x01" * 48  # type: ignore[index]


# -- envelope violations -------------------------------------------------------------------


def _envelope_items() -> list[Any]:
    return list(cbor2.loads(sample_bytes(GA_SAMPLE)))


def _with_item(index: int, value: Any) -> bytes:
    items = _envelope_items()
    items[index] = value
    return cbor2.dumps(items)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"", "not valid CBOR", id="empty"),
        pytest.param(sample_bytes(GA_SAMPLE) + b"\x00", "trailing bytes", id="trailing"),
        pytest.param(sample_bytes(GA_SAMPLE)[:-1], "not valid CBOR", id="truncated"),
        pytest.param(cbor2.dumps(_envelope_items()[:3]), "array of 4", id="three-items"),
        pytest.param(cbor2.dumps({"a": 1}), "array of 4", id="map"),
        pytest.param(
            cbor2.dumps(cbor2.CBORTag(98, _envelope_items())), "not COSE_Sign1", id="cose-sign"
        ),
        pytest.param(_with_item(0, cbor2.dumps({1: -7})), "protected header", id="es256"),
        pytest.param(_with_item(0, cbor2.dumps({1: -35, 4: b"k"})), "protected", id="extra-hdr"),
        pytest.param(_with_item(0, {1: -35}), "protected header", id="protected-not-bstr"),
        pytest.param(_with_item(1, {4: b"kid"}), "unprotected", id="unprotected-not-empty"),
        pytest.param(_with_item(1, []), "unprotected", id="unprotected-array"),
        pytest.param(_with_item(2, b""), "payload", id="empty-payload"),
        pytest.param(_with_item(2, "text"), "payload", id="payload-text"),
        pytest.param(_with_item(3, bytes(64)), "signature", id="es256-size-signature"),
        pytest.param(_with_item(3, None), "signature", id="no-signature"),
        pytest.param(
            b"\x9f" + b"".join(cbor2.dumps(item) for item in _envelope_items()) + b"\xff",
            "not valid CBOR",
            id="indefinite-array",
        ),
        pytest.param(bytes(MAX_DOCUMENT_SIZE + 1), "larger than", id="oversize"),
    ],
)
def test_malformed_envelopes_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(InvalidField, match=message):
        CoseSign1.decode(data)


def test_non_bytes_document_is_refused() -> None:
    with pytest.raises(InvalidField, match="must be bytes"):
        CoseSign1.decode("not bytes")  # type: ignore[arg-type]


# -- payload violations --------------------------------------------------------------------


def _payload() -> dict[str, Any]:
    return dict(cbor2.loads(CoseSign1.decode(sample_bytes(GA_SAMPLE)).payload))


def _changed(**changes: Any) -> bytes:
    payload = _payload()
    payload.update(changes)
    return cbor2.dumps(payload)


def _without(name: str) -> bytes:
    payload = _payload()
    del payload[name]
    return cbor2.dumps(payload)


@pytest.mark.parametrize(
    "name", ["module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle"]
)
def test_missing_required_fields_are_refused(name: str) -> None:
    with pytest.raises(InvalidField, match=f"no {name}"):
        AttestationDocument.decode(_without(name))


@pytest.mark.parametrize("name", ["public_key", "user_data", "nonce"])
def test_optional_fields_may_be_absent(name: str) -> None:
    assert getattr(AttestationDocument.decode(_without(name)), name) is None


def _pcrs(**changes: Any) -> dict[Any, Any]:
    pcrs: dict[Any, Any] = dict(_payload()["pcrs"])
    for key, value in changes.items():
        pcrs[int(key.removeprefix("pcr"))] = value
    return pcrs


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        pytest.param(_changed(extra=b""), "unknown field", id="unknown-field"),
        pytest.param(_changed(digest="SHA256"), "digest", id="sha256"),
        pytest.param(_changed(digest=b"SHA384"), "digest", id="digest-bytes"),
        pytest.param(_changed(module_id=""), "module_id", id="empty-module-id"),
        pytest.param(_changed(module_id=b"i-123"), "module_id", id="module-id-bytes"),
        pytest.param(_changed(module_id="m" * 257), "module_id", id="module-id-long"),
        pytest.param(_changed(timestamp=0), "timestamp", id="zero-timestamp"),
        pytest.param(_changed(timestamp=-1), "timestamp", id="negative-timestamp"),
        pytest.param(_changed(timestamp=1 << 63), "timestamp", id="huge-timestamp"),
        pytest.param(_changed(timestamp=True), "timestamp", id="bool-timestamp"),
        pytest.param(_changed(timestamp=1.5e12), "timestamp", id="float-timestamp"),
        pytest.param(_changed(timestamp="1695049410860"), "timestamp", id="text-timestamp"),
        pytest.param(_changed(pcrs={}), "pcrs", id="no-pcrs"),
        pytest.param(_changed(pcrs=[bytes(48)]), "pcrs", id="pcrs-array"),
        pytest.param(_changed(pcrs={i: bytes(48) for i in range(33)}), "pcrs", id="33-pcrs"),
        pytest.param(_changed(pcrs={32: bytes(48)}), "PCR index", id="pcr-index-32"),
        pytest.param(_changed(pcrs={"0": bytes(48)}), "PCR index", id="pcr-index-text"),
        pytest.param(_changed(pcrs=_pcrs(pcr0=bytes(32))), "PCR0", id="sha256-size-pcr"),
        pytest.param(_changed(pcrs=_pcrs(pcr3=None)), "PCR3", id="null-pcr"),
        pytest.param(_changed(certificate=None), "certificate", id="null-certificate"),
        pytest.param(_changed(certificate=b""), "certificate", id="empty-certificate"),
        pytest.param(_changed(certificate=bytes(1025)), "certificate", id="big-certificate"),
        pytest.param(_changed(cabundle=[]), "cabundle", id="empty-cabundle"),
        pytest.param(_changed(cabundle=b"x"), "cabundle", id="cabundle-bytes"),
        pytest.param(_changed(cabundle=["cert"]), "cabundle", id="cabundle-text"),
        pytest.param(_changed(public_key=b""), "public_key", id="empty-public-key"),
        pytest.param(_changed(user_data=bytes(1025)), "user_data", id="big-user-data"),
        pytest.param(_changed(nonce="nonce"), "nonce", id="text-nonce"),
        pytest.param(_changed(nonce=7), "nonce", id="int-nonce"),
        pytest.param(cbor2.dumps([1, 2]), "map", id="array-payload"),
        pytest.param(cbor2.dumps(cbor2.CBORTag(1, 0)), "map", id="tagged-payload"),
        pytest.param(
            b"\xaa" + b"\x69module_id\x61x" + cbor2.dumps(_payload())[1:],
            "not valid CBOR",
            id="duplicate-key",
        ),
    ],
)
def test_malformed_payloads_are_refused(payload: bytes, message: str) -> None:
    with pytest.raises(InvalidField, match=message):
        AttestationDocument.decode(payload)
