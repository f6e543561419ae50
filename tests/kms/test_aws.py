from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from signd.errors import (
    AccessDenied,
    ConfigurationError,
    DependencyUnavailable,
    IntegrityError,
)
from signd.kms import kms_from_config
from signd.kms.aws import AwsKms
from tests.fixtures.servers import MotoServer, free_port, moto_server

pytestmark = pytest.mark.integration

CONTEXT = {"key_id": "k-1", "address": "0xabc"}


def create_key(server: MotoServer, alias: str | None = None) -> str:
    client = server.client("kms")
    key_id: str = client.create_key()["KeyMetadata"]["KeyId"]
    if alias is not None:
        client.create_alias(AliasName=alias, TargetKeyId=key_id)
    return key_id


@pytest.fixture
def key_id(moto_server: MotoServer) -> str:
    return create_key(moto_server)


@pytest.fixture
def kms(moto_server: MotoServer, key_id: str) -> AwsKms:
    return AwsKms(key_id, region="us-east-1", endpoint_url=moto_server.endpoint_url)


def test_round_trip(kms: AwsKms, key_id: str) -> None:
    data_key = kms.generate_data_key(encryption_context=CONTEXT)
    assert len(data_key.plaintext.reveal_bytes()) == 32
    assert data_key.kms_key_id.endswith(key_id)
    assert kms.decrypt(data_key.ciphertext, encryption_context=CONTEXT) == data_key.plaintext


def test_wrong_context_is_an_integrity_error(kms: AwsKms) -> None:
    data_key = kms.generate_data_key(encryption_context=CONTEXT)
    for context in ({"key_id": "k-2", "address": "0xabc"}, None):
        with pytest.raises(IntegrityError) as caught:
            kms.decrypt(data_key.ciphertext, encryption_context=context)
        assert caught.value.message == "data key ciphertext failed its integrity check"
        assert caught.value.__cause__ is None


def test_alias_works_as_key_id(moto_server: MotoServer) -> None:
    create_key(moto_server, alias="alias/signd-alias-test")
    kms = AwsKms(
        "alias/signd-alias-test", region="us-east-1", endpoint_url=moto_server.endpoint_url
    )
    data_key = kms.generate_data_key()
    assert kms.decrypt(data_key.ciphertext) == data_key.plaintext


def test_unknown_key_is_a_configuration_error(moto_server: MotoServer) -> None:
    kms = AwsKms("alias/does-not-exist", region="us-east-1", endpoint_url=moto_server.endpoint_url)
    with pytest.raises(ConfigurationError, match="NotFoundException"):
        kms.generate_data_key()
    with pytest.raises(ConfigurationError):
        kms.check_health()


def test_health_check(kms: AwsKms) -> None:
    kms.check_health()


def test_factory_builds_aws(moto_server: MotoServer, key_id: str, tmp_path: Any) -> None:
    settings = {
        "type": "aws",
        "key_id": key_id,
        "region": "us-east-1",
        "endpoint_url": moto_server.endpoint_url,
        "connect_timeout": 1,
        "max_attempts": 1,
    }
    kms = kms_from_config(settings, tmp_path)
    assert isinstance(kms, AwsKms)
    data_key = kms.generate_data_key()
    assert kms.decrypt(data_key.ciphertext) == data_key.plaintext


def test_server_stuck_down_then_back() -> None:
    """Paused or stopped moto → DependencyUnavailable within the timeouts; resumed or
    restarted → the same client object works again."""
    with moto_server() as server:
        create_key(server, alias="alias/signd-restart")
        kms = AwsKms(
            "alias/signd-restart",
            region="us-east-1",
            endpoint_url=server.endpoint_url,
            connect_timeout=0.5,
            read_timeout=0.5,
            max_attempts=2,
        )
        kms.check_health()

        def assert_unavailable_quickly() -> None:
            for call in (kms.generate_data_key, kms.check_health):
                started = time.monotonic()
                with pytest.raises(DependencyUnavailable):
                    call()
                assert time.monotonic() - started < 3.0

        def assert_round_trip() -> None:
            data_key = kms.generate_data_key(encryption_context=CONTEXT)
            decrypted = kms.decrypt(data_key.ciphertext, encryption_context=CONTEXT)
            assert decrypted == data_key.plaintext

        server.pause()
        assert_unavailable_quickly()
        server.resume()
        assert_round_trip()

        server.stop()
        assert_unavailable_quickly()
        server.start()
        create_key(server, alias="alias/signd-restart")  # moto forgets everything on restart
        kms.check_health()
        assert_round_trip()


def test_unresponsive_server_times_out() -> None:
    """A peer that accepts but never answers → DependencyUnavailable after the read timeout."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        kms = AwsKms(
            "k",
            region="us-east-1",
            endpoint_url=f"http://127.0.0.1:{port}",
            connect_timeout=0.5,
            read_timeout=0.5,
            max_attempts=1,
        )
        started = time.monotonic()
        with pytest.raises(DependencyUnavailable):
            kms.generate_data_key()
        assert time.monotonic() - started < 2.0


def test_nothing_listening_is_unavailable() -> None:
    kms = AwsKms(
        "k", region="us-east-1", endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1
    )
    with pytest.raises(DependencyUnavailable):
        kms.decrypt(b"\x01" * 64)


class _FailingKms:
    """A stand-in boto3 client that fails every call with one AWS error code."""

    def __init__(self, code: str, status: int = 400) -> None:
        self.code, self.status = code, status

    def _fail(self, **kwargs: Any) -> Any:
        from botocore.exceptions import ClientError

        response: Any = {
            "Error": {"Code": self.code, "Message": "m"},
            "ResponseMetadata": {"HTTPStatusCode": self.status},
        }
        raise ClientError(response, "Decrypt")

    generate_data_key = decrypt = describe_key = _fail


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("InvalidCiphertextException", 400, IntegrityError),
        ("IncorrectKeyException", 400, IntegrityError),
        ("AccessDeniedException", 400, AccessDenied),
        ("NotFoundException", 400, ConfigurationError),
        ("DisabledException", 400, ConfigurationError),
        ("ThrottlingException", 400, DependencyUnavailable),
        ("KMSInternalException", 500, DependencyUnavailable),
        ("SomethingNew", 503, DependencyUnavailable),
        ("SomethingNew", 400, ConfigurationError),
    ],
)
def test_error_translation(code: str, status: int, expected: type[Exception]) -> None:
    kms = AwsKms("k", client=_FailingKms(code, status))  # type: ignore[arg-type]
    for call in (kms.generate_data_key, lambda: kms.decrypt(b"blob"), kms.check_health):
        with pytest.raises(expected) as caught:
            call()
        assert type(caught.value) is expected


def test_missing_credentials_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    kms = AwsKms("k", region="us-east-1", endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ConfigurationError, match="NoCredentialsError"):
        kms.generate_data_key()


def test_missing_region_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.delenv("AWS_REGION", raising=False)
    with pytest.raises(ConfigurationError):
        AwsKms("k")


def test_data_key_stays_out_of_reprs_errors_and_logs(
    kms: AwsKms, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    data_key = kms.generate_data_key(encryption_context=CONTEXT)
    plaintext = data_key.plaintext.reveal_bytes()
    decrypted = kms.decrypt(data_key.ciphertext, encryption_context=CONTEXT)
    with pytest.raises(IntegrityError) as caught:
        kms.decrypt(data_key.ciphertext)
    texts = [repr(kms), repr(data_key), str(data_key), repr(decrypted), str(caught.value)]
    for text in texts:
        assert plaintext.hex() not in text
        assert repr(plaintext)[2:-1] not in text
    import base64

    assert "Response headers" in caplog.text  # botocore did log at DEBUG
    assert base64.b64encode(plaintext).decode() not in caplog.text
