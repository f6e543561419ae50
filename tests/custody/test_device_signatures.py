"""A device's signature (HSM, KMS, enclave) is checked against the key it was asked to sign
with; what fails the check is the custody's fault (integrity_error, 500), not the caller's."""

from __future__ import annotations

import os

import coincurve
import pytest

from signd.api.errors import wire_error
from signd.custody.base import KeyInfo, device_signature, utc_now
from signd.errors import IntegrityError

DIGEST = bytes(range(32))


def key_info(private: coincurve.PrivateKey) -> KeyInfo:
    return KeyInfo(
        key_id="k1",
        chain="ethereum",
        address="0x" + "00" * 20,
        public_key=private.public_key.format(),
        custody="hsm",
        created_at=utc_now(),
    )


def raw_signature(private: coincurve.PrivateKey) -> bytes:
    return private.sign_recoverable(DIGEST, hasher=None)[:64]


def test_the_keys_own_raw_signature_is_made_recoverable() -> None:
    private = coincurve.PrivateKey(os.urandom(32))
    signature = device_signature(raw_signature(private), DIGEST, key_info(private))
    assert signature.recover_public_key(DIGEST) == private.public_key.format()


@pytest.mark.parametrize(
    "output",
    [
        pytest.param(lambda other: raw_signature(other), id="another-keys-signature"),
        pytest.param(lambda other: b"\x00" * 64, id="zero-r-and-s"),
        pytest.param(lambda other: b"\x30\x02\x01", id="broken-der"),
        pytest.param(lambda other: b"\x01" * 10, id="wrong-length"),
    ],
)
def test_an_unusable_device_signature_is_an_integrity_error_not_a_bad_request(
    output: object,
) -> None:
    private, other = coincurve.PrivateKey(os.urandom(32)), coincurve.PrivateKey(os.urandom(32))
    with pytest.raises(IntegrityError, match="custody's signature for key k1 is unusable") as bad:
        device_signature(output(other), DIGEST, key_info(private))  # type: ignore[operator]
    wire = wire_error(bad.value)
    assert (wire.http_status, wire.body["code"]) == (500, "integrity_error")
