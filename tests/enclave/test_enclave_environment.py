"""What of the host's environment an auto-started local enclave gets (an allowlist); the
running process is checked in ``test_local_process.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from signd.config import load_settings, override_variables
from signd.operations.backends import enclave_environment
from signd.operations.local_enclave import EnclaveEnvironment

HOST = {
    "PATH": "/usr/bin",
    "HOME": "/home/signd",
    "LC_ALL": "C.UTF-8",
    "PYTHONPATH": "/opt/signd",
    "LD_LIBRARY_PATH": "/opt/vendor/lib",
    "SIGND_ENCLAVE_CACHE_MAX_AGE": "60",
    "SIGND_KMS_KEY_ID": "alias/signd",
    "SIGND_BLOBS_BUCKET": "keys",
    "SIGND_HSM_MODULE": "/opt/vendor/libpkcs11.so",
    "SIGND_HSM_IN_ENCLAVE": "true",
    "SIGND_HSM_PIN": "pin",
    "SIGND_KEYSTORE_PASSPHRASE": "passphrase",
    "SIGND_METADATA_DSN": "postgresql://signd:password@db/signd",
    "SIGND_KMS_CUSTODY_REGION": "eu-west-1",
    "SIGND_KMS_SECRET_ACCESS_KEY": "secret",
    "OTHER_PIN": "pin in a variable of the operator's choosing",
    "DB_PASSWORD": "password",
    "SOFTHSM2_CONF": "/etc/softhsm2.conf",
    "AWS_ACCESS_KEY_ID": "AKIA",
    "AWS_SECRET_ACCESS_KEY": "secret",
    "HTTPS_PROXY": "http://proxy:3128",
    "VENDOR_CONFIG": "/etc/vendor.conf",
    "UNRELATED": "x",
}
ALWAYS = {
    "PATH",
    "HOME",
    "LC_ALL",
    "PYTHONPATH",
    "LD_LIBRARY_PATH",
    "SIGND_ENCLAVE_CACHE_MAX_AGE",
    "SIGND_KMS_KEY_ID",
    "SIGND_BLOBS_BUCKET",
    "SIGND_HSM_MODULE",
    "SIGND_HSM_IN_ENCLAVE",
}
REFERENCES = {"hsm.pin": "OTHER_PIN", "metadata.password": "DB_PASSWORD"}


def test_override_variables_are_those_of_the_sections_asked_for_never_a_secret() -> None:
    assert override_variables(("enclave", "kms", "blobs", "hsm"), HOST) == {
        "SIGND_ENCLAVE_CACHE_MAX_AGE",
        "SIGND_KMS_KEY_ID",
        "SIGND_BLOBS_BUCKET",
        "SIGND_HSM_MODULE",
        "SIGND_HSM_IN_ENCLAVE",
    }
    assert override_variables(("kms_custody",), HOST) == {"SIGND_KMS_CUSTODY_REGION"}
    assert override_variables(("metadata",), HOST) == {"SIGND_METADATA_DSN"}
    assert override_variables(("kms",), {"SIGND_KMS_": "x"}) == set()


@pytest.mark.parametrize(
    ("environment", "added"),
    [
        (EnclaveEnvironment(secret_references=REFERENCES), set()),
        (
            EnclaveEnvironment(hsm_in_enclave=True, secret_references=REFERENCES),
            {"SIGND_HSM_PIN", "OTHER_PIN", "SOFTHSM2_CONF"},
        ),
        (
            EnclaveEnvironment(uses_aws=True),
            {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HTTPS_PROXY"},
        ),
        (
            EnclaveEnvironment(
                secret_references=REFERENCES,
                passed=frozenset({"VENDOR_CONFIG", "OTHER_PIN", "SIGND_KEYSTORE_PASSPHRASE"}),
            ),
            {"VENDOR_CONFIG"},
        ),
    ],
    ids=["sealed-keys-only", "hsm-in-the-enclave", "aws", "passed"],
)
def test_the_enclave_gets_the_allowlist_and_what_its_parts_read(
    environment: EnclaveEnvironment, added: set[str]
) -> None:
    given = environment.of(HOST)
    assert set(given) == ALWAYS | added
    assert all(given[name] == HOST[name] for name in given)


@pytest.mark.parametrize(
    ("config", "hsm", "aws"),
    [
        ("", False, False),
        ('[kms]\ntype = "aws"\nkey_id = "alias/signd"\n', False, True),
        ('[blobs]\ntype = "s3"\nbucket = "keys"\n', False, True),
        ('[hsm]\nin_enclave = true\npin = "aws-sm:prod/signd/hsm#pin"\n', True, True),
        ('[hsm]\nin_enclave = true\npin = {provider = "aws-sm", name = "hsm"}\n', True, True),
        ('[hsm]\nin_enclave = true\npin = "file:/run/pin"\n', True, False),
        ('[hsm]\npin = "aws-sm:prod/signd/hsm#pin"\n', False, False),
        ('[kms_custody]\nkey_id = "alias/custody"\n', False, False),
    ],
    ids=[
        "default",
        "aws-kms",
        "s3",
        "aws-sm-pin",
        "aws-sm-pin-table",
        "file-pin",
        "aws-sm-pin-hsm-on-host",
        "kms-custody-is-the-hosts",
    ],
)
def test_what_the_configuration_gives_the_enclave(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: str, hsm: bool, aws: bool
) -> None:
    monkeypatch.delenv("SIGND_HSM_IN_ENCLAVE", raising=False)
    (tmp_path / "signd.toml").write_text(config + '\n[enclave]\npass_environment = ["X"]\n')
    environment = enclave_environment(load_settings(tmp_path))
    assert (environment.hsm_in_enclave, environment.uses_aws) == (hsm, aws)
    assert environment.passed == {"X"}
