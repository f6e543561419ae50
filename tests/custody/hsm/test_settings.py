"""HsmSettings: the [hsm] table, SIGND_HSM_* overrides, PIN references, masking."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from signd.crypto.secret import Secret
from signd.custody.hsm import HsmSettings, hsm_in_enclave
from signd.errors import ConfigurationError
from signd.secrets import default_providers, resolve_reference

PIN = "crypto_user:S3cr3t-4711"


def test_from_mapping_resolves_the_pin_reference(tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    section = {
        "module": "/opt/cloudhsm/lib/libcloudhsm_pkcs11.so",
        "token_label": "hsm1",
        "pin": f"file:{pin_file}",
        "pool_size": 8,
        "acquire_timeout": 5,
        "reconnect_interval": 0.5,
        "key_label_prefix": "exchange",
    }
    settings = HsmSettings.from_mapping(section, env={})
    assert settings.module_path == Path("/opt/cloudhsm/lib/libcloudhsm_pkcs11.so")
    assert settings.token_label == "hsm1" and settings.slot is None
    assert settings.pin.reveal() == PIN
    assert (settings.pool_size, settings.acquire_timeout, settings.reconnect_interval) == (
        8,
        5,
        0.5,
    )
    assert settings.key_label_prefix == "exchange"
    assert PIN not in repr(settings) and PIN not in str(settings)


def test_environment_overrides_the_table() -> None:
    section = {"module": "/a.so", "slot": 3, "pin": "env:UNSET_PIN_VARIABLE"}
    env = {"SIGND_HSM_MODULE": "/b.so", "SIGND_HSM_TOKEN_LABEL": "from-env", "SIGND_HSM_PIN": PIN}
    settings = HsmSettings.from_mapping(section, env=env)
    assert settings.module_path == Path("/b.so")
    assert settings.token_label == "from-env" and settings.slot is None
    assert settings.pin == Secret(PIN)


def test_pin_reference_goes_through_the_resolver() -> None:
    asked: list[Any] = []

    def resolve(ref: Any) -> Secret:
        asked.append(ref)
        return Secret(PIN)

    table = {"provider": "aws-sm", "name": "prod/hsm", "field": "pin"}
    settings = HsmSettings.from_mapping(
        {"module": "/a.so", "slot": 0, "pin": table}, env={}, resolve=resolve
    )
    assert asked == [table]
    assert settings.slot == 0 and settings.pin.reveal() == PIN


def test_env_reference_uses_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_HSM_PIN", PIN)
    settings = HsmSettings.from_mapping(
        {"module": "/a.so", "token_label": "t", "pin": "env:MY_HSM_PIN"},
        env={},
        resolve=resolve_reference,
    )
    assert settings.pin.reveal() == PIN


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"token_label": "t", "pin": "env:X"}, "no PKCS#11 module"),
        ({"module": "/a.so", "pin": "env:X"}, "exactly one of token_label and slot"),
        ({"module": "/a.so", "token_label": "t", "slot": 1, "pin": "env:X"}, "exactly one"),
        ({"module": "/a.so", "token_label": "t"}, "no PIN"),
        ({"module": "/a.so", "slot": "1", "pin": "env:X"}, "slot must be an integer"),
        ({"module": "/a.so", "token_label": "t", "pin": "env:X", "pool_size": 0}, "pool_size"),
        (
            {"module": "/a.so", "token_label": "t", "pin": "env:X", "acquire_timeout": "1"},
            "seconds",
        ),
        ({"module": "/a.so", "token_label": "t", "pin": "env:X", "colour": "red"}, "unknown"),
        ({"module": "/a.so", "token_label": "t", "pin": PIN}, "must start with one of"),
    ],
)
def test_bad_settings(section: dict[str, Any], message: str) -> None:
    providers = default_providers(environ={"X": "1234"})
    with pytest.raises(ConfigurationError, match=message) as raised:
        HsmSettings.from_mapping(
            section, env={}, resolve=lambda ref: resolve_reference(ref, providers)
        )
    assert PIN not in str(raised.value)
    assert "crypto_user" not in str(raised.value)


def test_in_enclave_flag_from_the_table_or_the_environment() -> None:
    assert hsm_in_enclave({}, {}) is False
    assert hsm_in_enclave({"in_enclave": True}, {}) is True
    assert hsm_in_enclave({"in_enclave": False}, {"SIGND_HSM_IN_ENCLAVE": "true"}) is True
    assert hsm_in_enclave({"in_enclave": True}, {"SIGND_HSM_IN_ENCLAVE": "0"}) is False
    for section, env in (({"in_enclave": "yes"}, {}), ({}, {"SIGND_HSM_IN_ENCLAVE": "maybe"})):
        with pytest.raises(ConfigurationError):
            hsm_in_enclave(section, env)
    section = {"module": "/x.so", "token_label": "t", "in_enclave": True}
    settings = HsmSettings.from_mapping(section, {"SIGND_HSM_PIN": "1234"})
    assert settings.token_label == "t"
