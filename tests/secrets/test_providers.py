"""Secrets providers: environment, owner-only files, AWS Secrets Manager (a real moto_server)."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
from pathlib import Path
from typing import Any

import pytest

from signd.config import load_settings
from signd.crypto.secret import Secret
from signd.errors import ConfigurationError, DependencyUnavailable
from signd.secrets import (
    AwsSecretsManager,
    EnvSecrets,
    FileSecrets,
    SecretRef,
    default_providers,
    parse_secret_ref,
    read_secret_file,
    resolve_reference,
    resolve_secret,
)
from tests.fixtures.servers import MotoServer

VALUE = "pin-" + secrets.token_hex(8)


def assert_hidden(value: str, *texts: str) -> None:
    for text in texts:
        assert value not in text


# ------------------------------------------------------------------ references


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("env:SIGND_PIN", SecretRef("env", "SIGND_PIN")),
        ("file:/etc/signd/pin", SecretRef("file", "/etc/signd/pin")),
        ("file:/odd#name", SecretRef("file", "/odd#name")),
        ("aws-sm:prod/hsm", SecretRef("aws-sm", "prod/hsm")),
        ("aws-sm:prod/hsm#pin", SecretRef("aws-sm", "prod/hsm", "pin")),
        (
            "aws-sm:arn:aws:secretsmanager:eu-west-1:123456789012:secret:hsm-AbCdEf#pin",
            SecretRef(
                "aws-sm", "arn:aws:secretsmanager:eu-west-1:123456789012:secret:hsm-AbCdEf", "pin"
            ),
        ),
        ({"provider": "aws-sm", "name": "hsm", "field": "pin"}, SecretRef("aws-sm", "hsm", "pin")),
        ({"provider": "env", "name": "X"}, SecretRef("env", "X")),
    ],
)
def test_parse_secret_ref(text: Any, ref: SecretRef) -> None:
    assert parse_secret_ref(text) == ref


@pytest.mark.parametrize(
    "bad",
    ["1234", "env:", "", 1234, {"provider": "env"}, {"provider": "env", "name": "X", "extra": 1}],
)
def test_bad_references_are_configuration_errors(bad: Any) -> None:
    with pytest.raises(ConfigurationError):
        parse_secret_ref(bad)


def test_a_literal_value_is_not_echoed_back_in_the_error() -> None:
    with pytest.raises(ConfigurationError) as raised:
        parse_secret_ref(VALUE)
    assert_hidden(VALUE, str(raised.value))


def test_unknown_provider() -> None:
    with pytest.raises(ConfigurationError, match="must start with one of env:") as raised:
        resolve_reference("vault:secret/hsm", {"env": EnvSecrets({})})
    assert "vault" not in str(raised.value)


# ------------------------------------------------------------------ environment


def test_the_variables_env_references_in_the_config_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What keeps them out of child processes that do not use them: every ``env:`` reference
    at a secret key, in either form and at any depth; other providers, malformed references
    and non-secret keys are not."""
    monkeypatch.setenv("SIGND_HSM_PIN", "not a reference")
    (tmp_path / "signd.toml").write_text(
        '[hsm]\npin = "env:OTHER_PIN"\nmodule = "env:NOT_A_SECRET_KEY"\n\n'
        '[metadata]\npassword = {provider = "env", name = "DB_PASSWORD"}\n\n'
        '[kms]\nsecret_access_key = "file:/run/kms-secret"\n\n'
        '[proxy.upstream]\npassword = "env:NESTED"\n\n'
        '[blobs]\npassphrase = "not-a-reference"\n'
    )
    assert load_settings(tmp_path).environment_secret_references() == {
        "hsm.pin": "OTHER_PIN",
        "metadata.password": "DB_PASSWORD",
        "proxy.upstream.password": "NESTED",
    }


def test_env_secrets() -> None:
    provider = EnvSecrets({"SIGND_TEST_PIN": VALUE, "EMPTY": ""})
    secret = provider.get("SIGND_TEST_PIN")
    assert secret.reveal() == VALUE
    assert_hidden(VALUE, repr(secret), str(secret), f"{secret}", repr(provider))
    with pytest.raises(ConfigurationError, match="MISSING"):
        provider.get("MISSING")
    with pytest.raises(ConfigurationError):
        provider.get("EMPTY")
    with pytest.raises(ConfigurationError, match="no fields"):
        provider.get_field("SIGND_TEST_PIN", "pin")


def test_resolve_reference_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGND_TEST_PIN", VALUE)
    assert resolve_reference("env:SIGND_TEST_PIN").reveal() == VALUE


# ------------------------------------------------------------------ files


def write_secret(path: Path, text: str, mode: int) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_file_secrets_owner_only(tmp_path: Path) -> None:
    path = write_secret(tmp_path / "pin", VALUE + "\n", 0o600)
    assert FileSecrets().get(str(path)).reveal() == VALUE
    assert FileSecrets(tmp_path).get("pin").reveal() == VALUE
    assert resolve_reference(f"file:{path}").reveal() == VALUE


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o620])
def test_file_secrets_refuse_group_or_world_access(tmp_path: Path, mode: int) -> None:
    path = write_secret(tmp_path / "pin", VALUE, mode)
    with pytest.raises(ConfigurationError, match="chmod 600") as raised:
        FileSecrets().get(str(path))
    assert_hidden(VALUE, str(raised.value))


def test_file_secrets_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read"):
        FileSecrets().get(str(tmp_path / "absent"))
    with pytest.raises(ConfigurationError, match="empty"):
        read_secret_file(write_secret(tmp_path / "empty", "\n", 0o600))
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe")
    binary.chmod(0o600)
    with pytest.raises(ConfigurationError, match="UTF-8"):
        read_secret_file(binary)


def test_resolve_secret_keeps_its_cli_contract(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SIGND_TEST_PASS", raising=False)
    path = write_secret(tmp_path / "pass", VALUE, 0o600)
    assert (
        resolve_secret(
            what="passphrase", env_var="SIGND_TEST_PASS", file=path, prompt=False
        ).reveal()
        == VALUE
    )
    monkeypatch.setenv("SIGND_TEST_PASS", "from-env")
    assert (
        resolve_secret(what="passphrase", env_var="SIGND_TEST_PASS", file=path).reveal()
        == "from-env"
    )
    monkeypatch.delenv("SIGND_TEST_PASS")
    with pytest.raises(ConfigurationError, match="SIGND_TEST_PASS"):
        resolve_secret(what="passphrase", env_var="SIGND_TEST_PASS", prompt=False)


# ------------------------------------------------------------------ AWS Secrets Manager


@pytest.fixture
def aws(moto_server: MotoServer) -> AwsSecretsManager:
    return AwsSecretsManager(region="us-east-1", endpoint_url=moto_server.endpoint_url)


def create_secret(moto_server: MotoServer, **kwargs: Any) -> str:
    name = "signd/test/" + secrets.token_hex(4)
    moto_server.client("secretsmanager").create_secret(Name=name, **kwargs)
    return name


@pytest.mark.integration
def test_aws_secret_string(
    moto_server: MotoServer, aws: AwsSecretsManager, caplog: pytest.LogCaptureFixture
) -> None:
    name = create_secret(moto_server, SecretString=VALUE)
    caplog.set_level(logging.DEBUG)
    secret = aws.get(name)
    assert secret == Secret(VALUE)
    assert_hidden(VALUE, repr(secret), str(secret), repr(aws), caplog.text)
    assert name in caplog.text
    assert "Response headers" in caplog.text, "botocore's DEBUG logging was captured"


@pytest.mark.integration
def test_aws_secret_binary(moto_server: MotoServer, aws: AwsSecretsManager) -> None:
    name = create_secret(moto_server, SecretBinary=VALUE.encode())
    assert aws.get(name).reveal_bytes() == VALUE.encode()


@pytest.mark.integration
def test_aws_json_field_selection(moto_server: MotoServer, aws: AwsSecretsManager) -> None:
    document = {"pin": "crypto_user:" + VALUE, "other": "x", "number": 7}
    name = create_secret(moto_server, SecretString=json.dumps(document))
    assert aws.get(f"{name}#pin").reveal() == "crypto_user:" + VALUE
    providers = default_providers(aws=aws)
    assert resolve_reference(f"aws-sm:{name}#pin", providers).reveal() == "crypto_user:" + VALUE
    table = {"provider": "aws-sm", "name": name, "field": "pin"}
    assert resolve_reference(table, providers).reveal() == "crypto_user:" + VALUE
    for field in ("absent", "number"):
        with pytest.raises(ConfigurationError) as raised:
            aws.get(f"{name}#{field}")
        assert_hidden(VALUE, str(raised.value))
    plain = create_secret(moto_server, SecretString=VALUE)
    with pytest.raises(ConfigurationError, match="not a JSON object") as raised:
        aws.get(f"{plain}#pin")
    assert_hidden(VALUE, str(raised.value))


@pytest.mark.integration
def test_aws_missing_secret_is_a_configuration_error(aws: AwsSecretsManager) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        aws.get("signd/test/never-created")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.integration
def test_aws_unreachable_is_dependency_unavailable(moto_server: MotoServer) -> None:
    provider = AwsSecretsManager(
        region="us-east-1",
        endpoint_url=f"http://127.0.0.1:{closed_port()}",
        connect_timeout=0.5,
        read_timeout=0.5,
        max_attempts=1,
    )
    with pytest.raises(DependencyUnavailable, match="unreachable"):
        provider.get("signd/test/anything")


@pytest.mark.integration
def test_aws_stuck_server_times_out_as_dependency_unavailable(moto_server: MotoServer) -> None:
    name = create_secret(moto_server, SecretString=VALUE)
    provider = AwsSecretsManager(
        region="us-east-1",
        endpoint_url=moto_server.endpoint_url,
        connect_timeout=0.5,
        read_timeout=0.5,
        max_attempts=1,
    )
    moto_server.pause()
    try:
        with pytest.raises(DependencyUnavailable) as raised:
            provider.get(name)
    finally:
        moto_server.resume()
    assert_hidden(VALUE, str(raised.value))
    assert provider.get(name).reveal() == VALUE


def test_aws_server_errors_are_dependency_unavailable() -> None:
    from botocore.exceptions import ClientError

    class Failing:
        def get_secret_value(self, SecretId: str) -> dict[str, Any]:
            raise ClientError(
                {"Error": {"Code": "InternalServiceError", "Message": "boom"}}, "GetSecretValue"
            )

    with pytest.raises(DependencyUnavailable, match="InternalServiceError"):
        AwsSecretsManager(client=Failing()).get("x")


def test_aws_access_denied_is_a_configuration_error() -> None:
    from botocore.exceptions import ClientError

    class Refusing:
        def get_secret_value(self, SecretId: str) -> dict[str, Any]:
            raise ClientError(
                {"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "GetSecretValue"
            )

    with pytest.raises(ConfigurationError, match="IAM"):
        AwsSecretsManager(client=Refusing()).get("x")


def test_no_region_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    with pytest.raises(ConfigurationError, match="client"):
        AwsSecretsManager().get("x")
