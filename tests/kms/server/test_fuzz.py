"""Random, signed requests to every kms-server operation, built from valid ones with one
thing wrong: each is answered 200 or with an AWS-shaped 4xx error, never a 500, and the
server keeps working."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signd.kms.server import RunningServer, start_kms_server
from tests.kms.server.conftest import raw_request
from tests.mutations import one_thing_wrong

pytestmark = pytest.mark.integration

CONTEXT = {"service": "signd", "purpose": "fuzz"}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Any]]:
    """One server for the module, with a symmetric key, a secp256k1 signing key and a
    ciphertext of the first: the valid requests every fuzzed one starts from."""
    home: Path = tmp_path_factory.mktemp("kms-fuzz") / "home"
    with start_kms_server(home) as server:
        symmetric = raw_request(server, b"{}", target="TrentService.CreateKey").body
        signing = raw_request(
            server,
            b'{"KeySpec": "ECC_SECG_P256K1", "KeyUsage": "SIGN_VERIFY"}',
            target="TrentService.CreateKey",
        ).body
        key_id = symmetric["KeyMetadata"]["KeyId"]
        signing_id = signing["KeyMetadata"]["KeyId"]
        encrypted = raw_request(
            server,
            _json({"KeyId": key_id, "Plaintext": _b64(b"x" * 32), "EncryptionContext": CONTEXT}),
            target="TrentService.Encrypt",
        ).body
        valid = {
            "CreateKey": {"Description": "d", "KeySpec": "SYMMETRIC_DEFAULT"},
            "DescribeKey": {"KeyId": key_id},
            "ListKeys": {"Limit": 5},
            "EnableKey": {"KeyId": key_id},
            "GetKeyPolicy": {"KeyId": key_id, "PolicyName": "default"},
            "GenerateDataKey": {
                "KeyId": key_id,
                "KeySpec": "AES_256",
                "EncryptionContext": CONTEXT,
            },
            "Encrypt": {
                "KeyId": key_id,
                "Plaintext": _b64(b"secret"),
                "EncryptionContext": CONTEXT,
            },
            "Decrypt": {
                "CiphertextBlob": encrypted["CiphertextBlob"],
                "EncryptionContext": CONTEXT,
            },
            "GetPublicKey": {"KeyId": signing_id},
            "Sign": {
                "KeyId": signing_id,
                "Message": _b64(b"\x11" * 32),
                "MessageType": "DIGEST",
                "SigningAlgorithm": "ECDSA_SHA_256",
            },
        }
        yield server, valid


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
@given(data=st.data())
def test_every_answer_is_a_success_or_an_aws_4xx(
    fuzzed: tuple[RunningServer, dict[str, dict[str, Any]]], data: st.DataObject
) -> None:
    server, valid = fuzzed
    operation = data.draw(st.sampled_from(sorted(valid)))
    body = data.draw(one_thing_wrong(copy.deepcopy(valid[operation])))
    answer = raw_request(server, _json(body), target=f"TrentService.{operation}")
    if answer.status != 200:
        assert 400 <= answer.status < 500, answer
        assert isinstance(answer.body["__type"], str) and answer.body["__type"]
        assert isinstance(answer.body["message"], str)
    assert raw_request(server, b"{}").status == 200  # still serving
