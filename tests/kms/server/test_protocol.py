"""The wire: SigV4 on raw requests, malformed bodies, oversized bodies — never a 500."""

from __future__ import annotations

import http.client
import json
import random
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from signd.crypto.secret import Secret
from signd.kms.server import MAX_BODY_SIZE, RunningServer
from signd.kms.server.errors import KmsApiError
from signd.kms.server.sigv4 import AccessKey, verify_request
from tests.kms.server.conftest import raw_request

pytestmark = pytest.mark.integration


def test_signed_raw_request_works(server: RunningServer) -> None:
    answer = raw_request(server, b"{}")
    assert answer.status == 200
    assert answer.body == {"Keys": [], "Truncated": False}


@pytest.mark.parametrize(
    ("body", "target", "expected"),
    [
        (b"{not json", "TrentService.ListKeys", "SerializationException"),
        (b"[1, 2]", "TrentService.ListKeys", "SerializationException"),
        (b"\xff\xfe", "TrentService.ListKeys", "SerializationException"),
        (b"[" * 5000 + b"]" * 5000, "TrentService.ListKeys", "SerializationException"),
        (b'{"KeyId": 5}', "TrentService.DescribeKey", "SerializationException"),
        (b'{"KeyId": ["a"]}', "TrentService.DescribeKey", "SerializationException"),
        (b"{}", "TrentService.DescribeKey", "ValidationException"),
        (b'{"KeyId": ""}', "TrentService.DescribeKey", "ValidationException"),
        (b'{"Limit": true}', "TrentService.ListKeys", "SerializationException"),
        (b'{"Limit": 0}', "TrentService.ListKeys", "ValidationException"),
        (b'{"CiphertextBlob": "***"}', "TrentService.Decrypt", "SerializationException"),
        (b'{"CiphertextBlob": "AAAA"}', "TrentService.Decrypt", "InvalidCiphertextException"),
        (b'{"Policy": "{"}', "TrentService.CreateKey", "MalformedPolicyDocumentException"),
        (b'{"Tags": [1]}', "TrentService.CreateKey", "SerializationException"),
        (b"{}", "TrentService.DeleteEverything", "UnknownOperationException"),
        (b"{}", "Other.ListKeys", "UnknownOperationException"),
    ],
)
def test_bad_requests_get_aws_errors(
    server: RunningServer, body: bytes, target: str, expected: str
) -> None:
    answer = raw_request(server, body, target=target)
    assert answer.status == 400
    assert answer.body["__type"] == expected
    assert isinstance(answer.body["message"], str)


def test_missing_authorization(server: RunningServer) -> None:
    answer = raw_request(server, b"{}", sign=False)
    assert (answer.status, answer.body["__type"]) == (400, "MissingAuthenticationTokenException")


def test_body_changed_after_signing(server: RunningServer) -> None:
    request = AWSRequest(
        method="POST",
        url=server.endpoint + "/",
        data=b'{"Limit": 1}',
        headers={"X-Amz-Target": "TrentService.ListKeys"},
    )
    access_key_id, secret = server.credentials
    SigV4Auth(Credentials(access_key_id, str(secret.reveal())), "kms", server.region).add_auth(
        request
    )
    address = urlsplit(server.endpoint)
    connection = http.client.HTTPConnection(address.hostname or "", address.port, timeout=10)
    headers = dict(request.headers.items())
    headers.pop("Content-Length", None)
    connection.request("POST", "/", body=b'{"Limit": 2}', headers=headers)
    response = connection.getresponse()
    assert response.status == 400
    assert json.loads(response.read())["__type"] == "InvalidSignatureException"
    connection.close()


def test_oversized_body_is_refused_unread(server: RunningServer) -> None:
    body = b'{"Description": "' + b"x" * MAX_BODY_SIZE + b'"}'
    answer = raw_request(server, body, target="TrentService.CreateKey")
    assert answer.status == 413
    assert answer.body["__type"] == "RequestEntityTooLargeException"
    assert raw_request(server, b"{}").body["Keys"] == []


def test_oversized_content_length_without_body(server: RunningServer) -> None:
    address = urlsplit(server.endpoint)
    connection = http.client.HTTPConnection(address.hostname or "", address.port, timeout=10)
    connection.putrequest("POST", "/")
    connection.putheader("Content-Length", str(10**12))
    connection.putheader("X-Amz-Target", "TrentService.ListKeys")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["__type"] == "RequestEntityTooLargeException"
    connection.close()


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_methods(server: RunningServer, method: str) -> None:
    address = urlsplit(server.endpoint)
    connection = http.client.HTTPConnection(address.hostname or "", address.port, timeout=10)
    connection.request(method, "/")
    response = connection.getresponse()
    assert response.status == 400
    assert json.loads(response.read())["__type"] == "UnknownOperationException"
    connection.close()


def test_random_bodies_never_get_a_500(server: RunningServer) -> None:
    generator = random.Random(1234)
    operations = [
        "CreateKey", "DescribeKey", "ListKeys", "EnableKey", "DisableKey", "GenerateDataKey",
        "Encrypt", "Decrypt", "GetPublicKey", "Sign", "Verify", "CreateAlias", "GetKeyPolicy",
    ]  # fmt: skip
    values: list[object] = [
        None, True, 0, -1, 2**70, 1.5, "", "x", "alias/x", "AAAA", "****", [], {}, ["a"],
        {"a": 1}, {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": "AA=="},
    ]  # fmt: skip
    fields = [
        "KeyId", "KeySpec", "KeyUsage", "NumberOfBytes", "Plaintext", "CiphertextBlob",
        "EncryptionContext", "Message", "MessageType", "Signature", "SigningAlgorithm",
        "Recipient", "Policy", "Tags", "Limit", "Marker", "AliasName", "TargetKeyId",
    ]  # fmt: skip
    for _ in range(150):
        body = {
            generator.choice(fields): generator.choice(values)
            for _ in range(generator.randint(0, 4))
        }
        operation = generator.choice(operations)
        answer = raw_request(server, json.dumps(body).encode(), target=f"TrentService.{operation}")
        assert answer.status < 500, (operation, body, answer.body)
    for _ in range(30):
        answer = raw_request(server, generator.randbytes(generator.randint(1, 200)))
        assert answer.status == 400


def _headers(now: datetime, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Headers botocore's own signer produces at ``now``."""
    import botocore.auth

    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: now.replace(tzinfo=None))
    request = AWSRequest(
        method="POST",
        url="http://127.0.0.1:1/",
        data=b"{}",
        headers={"X-Amz-Target": "TrentService.ListKeys"},
    )
    SigV4Auth(Credentials("AKIATEST", "secret"), "kms", "us-east-1").add_auth(request)
    return {name.lower(): value for name, value in request.headers.items()} | {
        "host": "127.0.0.1:1"
    }


ACCESS_KEYS = {"AKIATEST": AccessKey("AKIATEST", Secret("secret"), "arn:aws:iam::1:user/t")}


def _verify(headers: dict[str, str], now: datetime) -> AccessKey:
    return verify_request(
        method="POST",
        path="/",
        query="",
        headers=headers,
        body=b"{}",
        access_keys=ACCESS_KEYS,
        region="us-east-1",
        now=now,
    )


def test_sigv4_accepts_botocore_signatures_within_the_skew(monkeypatch: pytest.MonkeyPatch) -> None:
    signed_at = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    headers = _headers(signed_at, monkeypatch)
    assert _verify(headers, signed_at + timedelta(minutes=14)).access_key_id == "AKIATEST"


@pytest.mark.parametrize("offset", [timedelta(minutes=16), timedelta(minutes=-16)])
def test_sigv4_refuses_stale_or_future_requests(
    offset: timedelta, monkeypatch: pytest.MonkeyPatch
) -> None:
    signed_at = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    with pytest.raises(KmsApiError) as caught:
        _verify(_headers(signed_at, monkeypatch), signed_at + offset)
    assert caught.value.error_type == "InvalidSignatureException"


def test_sigv4_refuses_a_changed_signed_header(monkeypatch: pytest.MonkeyPatch) -> None:
    signed_at = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    headers = _headers(signed_at, monkeypatch) | {"x-amz-target": "TrentService.CreateKey"}
    with pytest.raises(KmsApiError) as caught:
        _verify(headers, signed_at)
    assert caught.value.error_type == "InvalidSignatureException"
