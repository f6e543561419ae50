"""Fixtures for the attestation tests: the AWS Nitro samples and a simulated NSM."""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from signd.attestation import SimulatedNsm
from tests.vectors import load_vectors, vector_path

NITRO = load_vectors("nitro_attestation.json")
SAMPLES: list[dict[str, Any]] = NITRO["samples"]
SAMPLE_IDS = [
    sample["source_path"].rsplit("/", 2)[-2] + "/" + sample["source_path"].rsplit("/", 1)[-1]
    for sample in SAMPLES
]


def sample_bytes(sample: dict[str, Any]) -> bytes:
    return base64.b64decode(sample["cose_sign1_base64"])


def sample_time(sample: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(sample["timestamp_utc"])


@pytest.fixture(scope="session")
def aws_root() -> x509.Certificate:
    """The AWS Nitro root, read from the vector PEM file (not from signd's own copy)."""
    return x509.load_pem_x509_certificate(
        vector_path("aws_nitro_enclaves_root_g1.pem").read_bytes()
    )


class ManualClock:
    """A clock tests move by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=UTC))


@pytest.fixture
def ca_directory(tmp_path: Path) -> Path:
    return tmp_path / "dev-ca"


@pytest.fixture
def make_nsm(ca_directory: Path, clock: ManualClock) -> Callable[..., SimulatedNsm]:
    def make(**kwargs: Any) -> SimulatedNsm:
        kwargs.setdefault("clock", clock)
        return SimulatedNsm(ca_directory, **kwargs)

    return make


@pytest.fixture
def nsm(make_nsm: Callable[..., SimulatedNsm]) -> SimulatedNsm:
    return make_nsm(config=b'{"policy": "test"}')
