"""``GET /v1/attestation`` and the ``attestation`` part of ``/readyz``: in-process against an
enclave over the in-process transport (honest, tampering, down, hanging), then against the real
``signd enclave`` process over its Unix socket, with the embedded kms-server's PCR0 pin."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.testclient import TestClient

from signd.api import ApiSettings, Principal
from signd.api.service import UngatedSigner
from signd.attestation import (
    AttestationProvider,
    SimulatedNsm,
    load_dev_root,
    measure,
    verify_attestation,
)
from signd.attestation.document import PCR_SIZE
from signd.attestation.measurement import measure_code
from signd.client import SigndClient
from signd.config import load_settings
from signd.enclave.client import EnclaveClient
from signd.enclave.server import EnclaveServer, start_enclave
from signd.enclave.transport import InProcessTransport
from signd.errors import AccessDenied, DependencyUnavailable
from signd.gate import Unauthenticated
from signd.kms.server import ServerInfo
from signd.operations import Signer
from signd.operations.attestation import DEV_ROOT, EnclaveAttestor, TrustAnchor, enclave_attestor
from signd.operations.local_kms import ATTESTED_ALIAS, attested_key_policy
from tests.api.conftest import ClientFactory, make_home, open_signer
from tests.attestation.tampering import tamper
from tests.enclave.fakes import MemoryBlobStore, MemoryKms

NONCE = bytes(range(32))
OTHER_PCR = b"\x5a" * PCR_SIZE


class TamperingNsm(AttestationProvider):
    """A provider whose documents are altered after signing (a PCR0 swapped in)."""

    def __init__(self, inner: SimulatedNsm) -> None:
        self.inner = inner

    def _attest(
        self, user_data: bytes | None, nonce: bytes | None, public_key: bytes | None
    ) -> bytes:
        document = self.inner.attest(user_data=user_data, nonce=nonce, public_key=public_key)
        return tamper(document, pcrs={**self.inner.pcrs, 0: OTHER_PCR})


@pytest.fixture
def dev_ca(tmp_path: Path) -> Path:
    return tmp_path / "dev-ca"


@pytest.fixture
def nsm(dev_ca: Path) -> SimulatedNsm:
    return SimulatedNsm(dev_ca)


@pytest.fixture
def make_enclave() -> Iterator[Callable[[AttestationProvider | None], EnclaveClient]]:
    """Enclaves over the in-process transport, each with its own provider."""
    opened: list[tuple[EnclaveServer, EnclaveClient]] = []

    def make(provider: AttestationProvider | None) -> EnclaveClient:
        server = start_enclave(None, MemoryKms(), MemoryBlobStore(), attestation=provider)
        client = EnclaveClient(InProcessTransport(server.serve_connection), timeout=5.0)
        opened.append((server, client))
        return client

    yield make
    for server, client in opened:
        client.close()
        server.close()


def attestor_for(fetch: Callable[[bytes], bytes], dev_ca: Path, **options: Any) -> EnclaveAttestor:
    return EnclaveAttestor(fetch, TrustAnchor(DEV_ROOT, lambda: load_dev_root(dev_ca)), **options)


@pytest.fixture
def honest_client(
    make_client: ClientFactory,
    make_enclave: Callable[[AttestationProvider | None], EnclaveClient],
    nsm: SimulatedNsm,
    dev_ca: Path,
) -> TestClient:
    return make_client(attestor=attestor_for(make_enclave(nsm).attestation, dev_ca))


def attestation_part(client: TestClient) -> tuple[int, dict[str, Any]]:
    response = client.get("/readyz")
    parts = {part["part"]: part for part in response.json()["parts"]}
    return response.status_code, parts["attestation"]


def test_a_fresh_document_binds_the_callers_nonce(
    honest_client: TestClient, nsm: SimulatedNsm
) -> None:
    response = honest_client.get("/v1/attestation", params={"nonce": NONCE.hex()})
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["nonce"] == NONCE.hex()
    assert body["verified"] == {"ok": True, "root": DEV_ROOT, "pinned_pcr0": []}
    assert body["pcrs"]["0"] == measure()[0].hex()
    assert set(body["pcrs"]) == {str(index) for index in range(16)}
    assert body["user_data"] is None
    assert body["module_id"] == nsm.module_id
    assert body["timestamp"].endswith("Z")
    # what a caller does: verify the raw document itself, against its own copy of the root
    attested = verify_attestation(
        base64.b64decode(body["document"]),
        root_certificates=[nsm.root_certificate],
        expected_pcrs={0: measure()[0]},
        nonce=NONCE,
        max_age=timedelta(minutes=5),
    )
    assert attested.module_id == body["module_id"]
    again = honest_client.get("/v1/attestation", params={"nonce": "0x" + "ab" * 64}).json()
    assert again["nonce"] == "ab" * 64 and again["document"] != body["document"]


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?nonce=",
        "?nonce=abc",
        "?nonce=zz",
        "?nonce=0x",
        "?nonce=" + "00" * 65,
        "?nonce=%20ab",
        "?other=ab",
    ],
)
def test_a_missing_or_bad_nonce_is_400(honest_client: TestClient, query: str) -> None:
    response = honest_client.get("/v1/attestation" + query)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_field"
    assert response.json()["error"]["field"] == "nonce"


def test_without_an_attesting_enclave_the_answer_is_404(client: TestClient) -> None:
    response = client.get("/v1/attestation", params={"nonce": "00"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "attestation_not_configured"
    assert client.get("/v1/attestation").status_code == 400
    ready = client.get("/readyz").json()
    assert "attestation" not in {part["part"] for part in ready["parts"]}


def test_an_enclave_without_a_provider_is_404_too(
    make_client: ClientFactory,
    make_enclave: Callable[[AttestationProvider | None], EnclaveClient],
    dev_ca: Path,
) -> None:
    client = make_client(attestor=attestor_for(make_enclave(None).attestation, dev_ca))
    response = client.get("/v1/attestation", params={"nonce": "00"})
    assert response.status_code == 404
    assert "no attestation provider" in response.json()["error"]["message"]
    status, part = attestation_part(client)
    assert status == 503 and part["code"] == "attestation_not_configured"


def test_the_endpoint_needs_no_credential(
    make_client: ClientFactory,
    make_enclave: Callable[[AttestationProvider | None], EnclaveClient],
    nsm: SimulatedNsm,
    dev_ca: Path,
    signer: Signer,
) -> None:
    async def refuse(request: Request) -> Principal:
        raise Unauthenticated("no credential")

    client = make_client(
        authenticate=refuse,
        gate=UngatedSigner(signer),
        attestor=attestor_for(make_enclave(nsm).attestation, dev_ca),
    )
    assert client.get("/v1/keys").status_code == 401
    assert client.get("/v1/attestation", params={"nonce": "01"}).status_code == 200


def test_readiness_includes_a_verified_attestation(honest_client: TestClient) -> None:
    response = honest_client.get("/readyz")
    assert response.status_code == 200
    assert {"part": "attestation", "status": "ok"} in response.json()["parts"]


def test_a_tampered_document_is_reported_and_makes_the_service_unready(
    make_client: ClientFactory,
    make_enclave: Callable[[AttestationProvider | None], EnclaveClient],
    nsm: SimulatedNsm,
    dev_ca: Path,
) -> None:
    enclave = make_enclave(TamperingNsm(nsm))
    client = make_client(attestor=attestor_for(enclave.attestation, dev_ca))
    body = client.get("/v1/attestation", params={"nonce": NONCE.hex()}).json()
    assert body["pcrs"]["0"] == OTHER_PCR.hex()
    assert body["verified"] == {
        "ok": False,
        "root": DEV_ROOT,
        "pinned_pcr0": [],
        "error": {
            "code": "attestation_invalid",
            "message": "attestation: COSE signature does not verify",
        },
    }
    status, part = attestation_part(client)
    assert status == 503
    assert part == {
        "part": "attestation",
        "status": "unavailable",
        "code": "attestation_invalid",
        "message": "attestation: COSE signature does not verify",
    }


def test_a_pcr0_that_kms_does_not_pin_makes_the_service_unready(
    make_client: ClientFactory,
    make_enclave: Callable[[AttestationProvider | None], EnclaveClient],
    nsm: SimulatedNsm,
    dev_ca: Path,
) -> None:
    fetch = make_enclave(nsm).attestation
    client = make_client(attestor=attestor_for(fetch, dev_ca, pinned_pcr0=lambda: [OTHER_PCR]))
    status, part = attestation_part(client)
    assert status == 503
    assert part["message"] == "attestation: PCR0 is not the one KMS is pinned to"
    verified = client.get("/v1/attestation", params={"nonce": "01"}).json()["verified"]
    assert verified["ok"] is False and verified["pinned_pcr0"] == [OTHER_PCR.hex()]


def test_an_enclave_that_is_down_is_503(
    make_client: ClientFactory,
    make_enclave: Callable[[AttestationProvider | None], EnclaveClient],
    nsm: SimulatedNsm,
    dev_ca: Path,
) -> None:
    server = start_enclave(None, MemoryKms(), MemoryBlobStore(), attestation=nsm)
    enclave = EnclaveClient(InProcessTransport(server.serve_connection), timeout=2.0)
    server.close()
    client = make_client(attestor=attestor_for(enclave.attestation, dev_ca))
    response = client.get("/v1/attestation", params={"nonce": "01"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "dependency_unavailable"
    status, part = attestation_part(client)
    assert status == 503 and part["code"] == "dependency_unavailable"
    enclave.close()


def test_readiness_does_not_wait_for_an_enclave_that_hangs(
    make_client: ClientFactory, dev_ca: Path
) -> None:
    release = threading.Event()

    def hanging(nonce: bytes) -> bytes:
        release.wait(5)
        raise DependencyUnavailable("too late")

    client = make_client(ApiSettings(health_timeout=0.2), attestor=attestor_for(hanging, dev_ca))
    try:
        status, part = attestation_part(client)
    finally:
        release.set()
    assert status == 503
    assert part["code"] == "dependency_unavailable" and "0.2s" in part["message"]


# the real enclave process, started by the host over its Unix socket


@pytest.mark.integration
def test_the_real_enclave_process_attests(make_client: ClientFactory, tmp_path: Path) -> None:
    home = make_home(tmp_path / "home", ("enclave", "keystore"), '[kms]\ntype = "local"\n')
    with open_signer(home) as signer:
        client = make_client(over=signer, attestor=enclave_attestor(load_settings(home), signer))
        body = client.get("/v1/attestation", params={"nonce": NONCE.hex()}).json()
        assert body["verified"] == {"ok": True, "root": DEV_ROOT, "pinned_pcr0": []}, body
        assert body["nonce"] == NONCE.hex()
        assert body["pcrs"]["0"] == measure_code().hex()
        verify_attestation(
            base64.b64decode(body["document"]),
            root_certificates=[load_dev_root(home / "attestation" / "dev-ca")],
            expected_pcrs={0: measure_code()},
            nonce=NONCE,
            max_age=timedelta(minutes=5),
        )
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert {"part": "attestation", "status": "ok"} in ready.json()["parts"]


@pytest.mark.integration
@pytest.mark.slow
def test_readiness_compares_pcr0_with_the_embedded_kms_pin(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    home = make_home(tmp_path / "home", ("enclave", "keystore"))
    with open_signer(home) as signer:
        client = make_client(over=signer, attestor=enclave_attestor(load_settings(home), signer))
        created = client.post("/v1/keys", json={"chain": "ethereum", "custody": "enclave"})
        assert created.status_code == 201, created.text  # the kms-server pins PCR0 now
        verified = client.get("/v1/attestation", params={"nonce": "01"}).json()["verified"]
        assert verified == {"ok": True, "root": DEV_ROOT, "pinned_pcr0": [measure_code().hex()]}

        kms = ServerInfo.read(home).client()
        key_arn = kms.describe_key(KeyId=ATTESTED_ALIAS)["KeyMetadata"]["Arn"]
        kms.put_key_policy(
            KeyId=key_arn, PolicyName="default", Policy=attested_key_policy(OTHER_PCR)
        )
        kms.close()
        repinned = make_client(over=signer, attestor=enclave_attestor(load_settings(home), signer))
        status, part = attestation_part(repinned)
        assert status == 503
        assert part["message"] == "attestation: PCR0 is not the one KMS is pinned to"


# the Python client verifies on its side


def test_the_python_client_verifies_the_document_itself(
    honest_client: TestClient, nsm: SimulatedNsm
) -> None:
    def forward(request: httpx.Request) -> httpx.Response:
        answer = honest_client.request(
            request.method, request.url.raw_path.decode(), headers=request.headers
        )
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    signd = SigndClient("http://signd", token="unused", transport=httpx.MockTransport(forward))
    attested = signd.attestation(
        NONCE, root_certificates=[nsm.root_certificate], expected_pcrs={0: measure()[0]}
    )
    assert attested.nonce == NONCE and attested.module_id == nsm.module_id
    assert len(signd.attestation(root_certificates=[nsm.root_certificate]).nonce or b"") == 32
    with pytest.raises(AccessDenied, match="not a trusted root"):
        signd.attestation()  # the AWS Nitro root by default
    with pytest.raises(AccessDenied, match="PCR0 does not match"):
        signd.attestation(root_certificates=[nsm.root_certificate], expected_pcrs={0: OTHER_PCR})
