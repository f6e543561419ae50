"""The NSM driver's wire format, and the device provider's failure paths."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509

from signd.attestation import NsmProvider, verify_attestation
from signd.attestation.providers import (
    NSM_DEVICE,
    NSM_IOCTL_RAW,
    NSM_MESSAGE,
    NSM_REQUEST_MAX_SIZE,
    decode_attestation_response,
    encode_attestation_request,
)
from signd.errors import ConfigurationError, DependencyUnavailable, InvalidField
from tests.attestation.conftest import SAMPLES, sample_bytes, sample_time


def test_ioctl_number_is_iowr_0x0a_0_nsm_raw() -> None:
    """``_IOWR(0x0A, 0, struct nsm_raw)`` with a 32-byte nsm_raw, as libnsm computes it."""
    assert NSM_MESSAGE.size == 32
    assert NSM_IOCTL_RAW == 0xC020_0A00


@pytest.mark.parametrize(
    ("user_data", "nonce", "public_key"),
    [(None, None, None), (b"user", b"\x00" * 64, b"\x30\x59key"), (b"", b"", None)],
)
def test_attestation_request_is_the_serde_enum(
    user_data: bytes | None, nonce: bytes | None, public_key: bytes | None
) -> None:
    request = cbor2.loads(encode_attestation_request(user_data, nonce, public_key))
    assert request == {
        "Attestation": {"user_data": user_data, "nonce": nonce, "public_key": public_key}
    }
    assert list(request["Attestation"]) == ["user_data", "nonce", "public_key"]


def test_oversize_request_is_refused() -> None:
    with pytest.raises(InvalidField, match="request is larger"):
        encode_attestation_request(bytes(NSM_REQUEST_MAX_SIZE), None, None)


def test_attestation_response_yields_a_verifiable_document(aws_root: x509.Certificate) -> None:
    sample = SAMPLES[1]
    response = cbor2.dumps({"Attestation": {"document": sample_bytes(sample)}})
    document = decode_attestation_response(response)
    assert document == sample_bytes(sample)
    verified = verify_attestation(
        document, root_certificates=[aws_root], max_age=timedelta(0), now=sample_time(sample)
    )
    assert verified.module_id == sample["module_id"]


@pytest.mark.parametrize("code", ["InvalidArgument", "InputTooLarge", "InternalError"])
def test_nsm_errors_are_reported(code: str) -> None:
    with pytest.raises(DependencyUnavailable, match=f"attestation failed: {code}"):
        decode_attestation_response(cbor2.dumps({"Error": code}))


@pytest.mark.parametrize(
    "response",
    [
        b"",
        b"\xff",
        bytes(16),
        cbor2.dumps("Attestation"),
        cbor2.dumps({"Attestation": {"document": b""}}),
        cbor2.dumps({"Attestation": {"document": "text"}}),
        cbor2.dumps({"Attestation": {"document": b"doc", "extra": 1}}),
        cbor2.dumps({"Attestation": {"document": b"doc"}, "Error": "InternalError"}),
        cbor2.dumps({"DescribeNSM": {"module_id": "x"}}),
        cbor2.dumps({"Error": 3}),
        cbor2.dumps({"Attestation": {"document": b"doc"}}) + b"\x00",
    ],
)
def test_malformed_responses_are_refused(response: bytes) -> None:
    with pytest.raises(DependencyUnavailable, match="nsm: "):
        decode_attestation_response(response)


def test_missing_device_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not a Nitro Enclave"):
        NsmProvider(tmp_path / "nsm")


@pytest.mark.skipif(NSM_DEVICE.exists(), reason="running inside a Nitro Enclave")
def test_default_device_is_absent_here() -> None:
    with pytest.raises(ConfigurationError, match="/dev/nsm does not exist"):
        NsmProvider()


def test_a_device_that_is_not_the_nsm_fails_the_ioctl(tmp_path: Path) -> None:
    impostor = tmp_path / "nsm"
    impostor.write_bytes(b"")
    with NsmProvider(impostor) as provider, pytest.raises(DependencyUnavailable, match="ioctl"):
        provider.attest(nonce=b"n")


def test_a_closed_provider_refuses(tmp_path: Path) -> None:
    device = tmp_path / "nsm"
    device.write_bytes(b"")
    provider = NsmProvider(device)
    provider.close()
    provider.close()
    with pytest.raises(DependencyUnavailable, match="closed"):
        provider.attest()


def test_provider_validates_inputs_before_the_device(tmp_path: Path) -> None:
    device = tmp_path / "nsm"
    device.write_bytes(b"")
    kwargs: dict[str, Any] = {"user_data": bytes(1025)}
    with NsmProvider(device) as provider, pytest.raises(InvalidField, match="user_data"):
        provider.attest(**kwargs)
