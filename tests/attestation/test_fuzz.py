"""Property tests: whatever arrives, only signd errors come out, and nothing forged verifies."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import cbor2
import pytest
from cryptography import x509
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from signd.attestation import AttestationDocument, CoseSign1, verify_attestation
from signd.attestation.providers import decode_attestation_response
from signd.errors import AccessDenied, DependencyUnavailable, InvalidField
from tests.attestation.conftest import SAMPLES, sample_bytes, sample_time

FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
GA_SAMPLE = SAMPLES[0]
GA_RAW = sample_bytes(GA_SAMPLE)

cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False)
    | st.binary(max_size=64)
    | st.text(max_size=16),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=12) | st.integers(0, 40), children, max_size=5)
        | st.builds(cbor2.CBORTag, st.sampled_from([1, 2, 18, 24, 258, 55799]), children)
    ),
    max_leaves=20,
)


def _verify(document: bytes, root: x509.Certificate) -> AttestationDocument:
    return verify_attestation(
        document,
        root_certificates=[root],
        max_age=timedelta(minutes=5),
        now=sample_time(GA_SAMPLE),
    )


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_raise_only_signd_errors(data: bytes, aws_root: x509.Certificate) -> None:
    with pytest.raises((InvalidField, AccessDenied)):
        _verify(data, aws_root)


@FUZZ
@given(value=cbor_values)
def test_random_cbor_raises_only_signd_errors(value: Any, aws_root: x509.Certificate) -> None:
    try:
        encoded = cbor2.dumps(value)
    except (cbor2.CBOREncodeError, ValueError, TypeError):
        return
    with pytest.raises((InvalidField, AccessDenied)):
        _verify(encoded, aws_root)
    with pytest.raises((InvalidField, AccessDenied)):
        _verify(CoseSign1(b"\xa1\x018\x22", encoded, bytes(96)).encode(), aws_root)


@FUZZ
@given(
    field=st.sampled_from(
        ["module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle", "nonce", "x"]
    ),
    value=cbor_values,
)
def test_a_replaced_payload_field_never_verifies(
    field: str, value: Any, aws_root: x509.Certificate
) -> None:
    envelope = CoseSign1.decode(GA_RAW)
    payload = dict(cbor2.loads(envelope.payload))
    payload[field] = value
    try:
        forged = cbor2.dumps(payload)
    except (cbor2.CBOREncodeError, ValueError, TypeError):
        return
    document = cbor2.dumps([envelope.protected, {}, forged, envelope.signature])
    with pytest.raises((InvalidField, AccessDenied)):
        _verify(document, aws_root)


@FUZZ
@given(offset=st.integers(0, len(GA_RAW) - 1), mask=st.integers(1, 255))
@example(offset=1958, mask=1)  # a duplicated KeyUsage extension in the root certificate
def test_any_corrupted_byte_is_refused(offset: int, mask: int, aws_root: x509.Certificate) -> None:
    corrupted = GA_RAW[:offset] + bytes([GA_RAW[offset] ^ mask]) + GA_RAW[offset + 1 :]
    with pytest.raises((InvalidField, AccessDenied)):
        _verify(corrupted, aws_root)


@FUZZ
@given(data=st.binary(max_size=512) | cbor_values.map(cbor2.dumps))
def test_random_nsm_responses_raise_only_dependency_errors(data: bytes) -> None:
    try:
        document = decode_attestation_response(data)
    except DependencyUnavailable:
        return
    assert cbor2.loads(data) == {"Attestation": {"document": document}}
    assert document
