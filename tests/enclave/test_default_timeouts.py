"""The default timeouts fit together: one call to a stuck dependency, made by the enclave,
fails there (a 503 naming the dependency, with the request's audit records) well before the
host stops waiting for the enclave. Were it the other way round, the caller would be answered
503 for a request the enclave goes on to complete (once, the host also dropped the connection
and the records sealed meanwhile, and later requests waited for those records: found by a
fault probe, S3 stopped, 5 s stalls for warm keys)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from botocore.config import Config

from signd.kms import kms_from_config
from signd.operations import local_kms
from signd.operations.backends import ENCLAVE_TIMEOUT
from signd.operations.components import BLOB_STORES

RETRY_BACKOFF = 1.0
"""The most botocore's standard mode waits before a retry, in its first attempts."""


def worst_call(config: Config) -> float:
    """Seconds one call may take against an endpoint that is stuck or unreachable: each
    attempt waits out its connect or its read timeout, with a back-off between attempts."""
    retries: dict[str, Any] = config.retries or {}
    attempts = int(retries.get("total_max_attempts", 1))
    per_attempt = max(float(config.connect_timeout), float(config.read_timeout))
    return attempts * per_attempt + (attempts - 1) * RETRY_BACKOFF


@pytest.fixture
def aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


def test_a_stuck_dependency_fails_in_the_enclave_before_the_host_gives_up(
    tmp_path: Path, aws_environment: None
) -> None:
    blobs = BLOB_STORES["s3"]({"type": "s3", "bucket": "b", "region": "us-east-1"}, tmp_path)
    kms = kms_from_config({"type": "aws", "key_id": "alias/k", "region": "us-east-1"}, tmp_path)
    calls = {
        "S3": blobs._client.meta.config,  # type: ignore[attr-defined]
        "AWS KMS": kms._client.meta.config,  # type: ignore[attr-defined]
        "embedded kms-server": local_kms._BOTO_CONFIG,
    }
    for name, config in calls.items():
        # Half the wait at most: a request makes other calls besides the one that is stuck.
        assert worst_call(config) <= ENCLAVE_TIMEOUT / 2, name
