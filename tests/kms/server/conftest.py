"""A kms-server per test (in a thread, state in a temp home), its boto3 client, raw requests."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from cryptography.hazmat.primitives.asymmetric import rsa

from signd.attestation import SimulatedNsm
from signd.kms.server import RunningServer, start_kms_server

DEV_CA = Path("attestation") / "dev-ca"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def server(home: Path) -> Iterator[RunningServer]:
    with start_kms_server(home) as running:
        yield running


@pytest.fixture(scope="session")
def boto3_session() -> Any:
    """One session for every test client: its service-model cache makes clients cheap."""
    import boto3

    return boto3.session.Session()


@pytest.fixture
def kms(server: RunningServer, boto3_session: Any) -> Any:
    access_key_id, secret = server.credentials
    return boto3_session.client(
        "kms",
        endpoint_url=server.endpoint,
        region_name=server.region,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=str(secret.reveal()),
    )


@pytest.fixture
def nsm(home: Path) -> SimulatedNsm:
    """A simulated NSM whose development CA is the one the server trusts by default."""
    return SimulatedNsm(home / DEV_CA, config=b"kms-server-tests")


@pytest.fixture(scope="session")
def recipient_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class RawResponse:
    status: int
    body: dict[str, Any]


def raw_request(
    server: RunningServer,
    body: bytes,
    *,
    target: str = "TrentService.ListKeys",
    sign: bool = True,
    secret: str | None = None,
    extra_headers: dict[str, str] | None = None,
) -> RawResponse:
    """POST ``body`` as-is (signed with botocore's own SigV4 signer unless ``sign`` is False)."""
    headers = {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": target}
    headers |= extra_headers or {}
    request = AWSRequest(method="POST", url=server.endpoint + "/", data=body, headers=headers)
    if sign:
        access_key_id, secret_access_key = server.credentials
        credentials = Credentials(access_key_id, secret or str(secret_access_key.reveal()))
        SigV4Auth(credentials, "kms", server.region).add_auth(request)
    prepared = urllib.request.Request(
        server.endpoint + "/", data=body, headers=dict(request.headers.items()), method="POST"
    )
    try:
        with urllib.request.urlopen(prepared, timeout=10) as response:
            return RawResponse(response.status, json.loads(response.read()))
    except urllib.error.HTTPError as error:
        return RawResponse(error.code, json.loads(error.read()))


def error_code(exc: Any) -> str:
    return str(exc.value.response["Error"]["Code"])
