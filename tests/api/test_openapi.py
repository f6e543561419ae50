"""The OpenAPI document: valid 3.1, exactly the app's routes, and true to the answers
(schemathesis fuzzes every operation in-process and checks for 5xx and schema violations)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Route

from signd.api import ApiSettings, allow_anonymous_for_tests, create_app
from signd.api.openapi import openapi_document
from tests.api.conftest import ClientFactory, make_home, open_signer
from tests.gate.support import (
    BROAD_TOKEN,
    GATE_MODES,
    TestClient,
    broad_gate_files,
    gated_service,
)

FUZZ_SETTINGS = ApiSettings(max_keys_per_request=3, max_batch=5, allow_blind_signing=True)
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def test_the_document_is_valid_openapi_3_1() -> None:
    document = openapi_document()
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_the_document_lists_exactly_the_routes_of_the_app(tmp_path: Path) -> None:
    with open_signer(make_home(tmp_path / "home")) as signer:
        app = create_app(signer, authenticate=allow_anonymous_for_tests)
    served = set()
    for route in app.routes:
        assert isinstance(route, Route)
        for method in route.methods or ():
            if method != "HEAD":
                served.add((route.path, method.lower()))
    documented = {
        (path, method)
        for path, item in openapi_document()["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }
    assert served == documented


def test_the_app_serves_the_document_for_its_settings(make_client: ClientFactory) -> None:
    client = make_client(FUZZ_SETTINGS)
    served = client.get("/openapi.json").json()
    assert served == openapi_document(FUZZ_SETTINGS)
    batch = served["components"]["schemas"]["BatchRequest"]["properties"]["requests"]
    assert batch["maxItems"] == 5


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    home = make_home(tmp_path_factory.mktemp("fuzz") / "home")
    with open_signer(home) as signer:
        signer.create_keys(chain="ethereum", custody="keystore", count=1)
        app = create_app(signer, FUZZ_SETTINGS, authenticate=allow_anonymous_for_tests)
        yield schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")
JSON_RPC_PATHS = {"/", "/rpc"}


def checks_for(case: Any) -> list[Any]:
    """No 5xx, and statuses, content types and bodies as documented. Bodies the document
    forbids must be refused with a 4xx, except by JSON-RPC, which answers them with a JSON-RPC
    error and HTTP 200, as the protocol asks. (Schema-valid requests may still be refused: an
    unconfigured custody, an unknown key.)"""
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    if case.operation.path not in JSON_RPC_PATHS:
        checks.append(negative_data_rejection)
    return checks


@schema.parametrize()
@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_server_errors_and_answers_match_the_document(case: Any) -> None:
    case.call_and_validate(checks=checks_for(case))


GATED_FUZZ_SETTINGS = replace(FUZZ_SETTINGS, auth_failure_rate_limit=0.0)


@pytest.fixture(scope="module", params=GATE_MODES)
def gated_api_schema(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """The app as ``signd serve`` gates it (authentication, policy, audit; in the service or
    in an enclave), for a bearer client that every scope and a broad policy let through."""
    home = tmp_path_factory.mktemp(f"fuzz-{request.param}") / "home"
    with gated_service(home, request.param, GATED_FUZZ_SETTINGS, broad_gate_files) as service:
        custody = "enclave" if request.param == "enclave" else "keystore"
        with TestClient(service.app) as client:  # through the gate: the enclave is gate-only
            made = client.post(
                "/v1/keys",
                json={"chain": "ethereum", "custody": custody},
                headers={"authorization": f"Bearer {BROAD_TOKEN}"},
            )
            assert made.status_code == 201, made.text
        yield schemathesis.openapi.from_asgi("/openapi.json", service.app)


gated_schema = schemathesis.pytest.from_fixture("gated_api_schema")


@gated_schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_the_gated_app_has_no_server_errors_and_answers_match_the_document(case: Any) -> None:
    """The same checks through the gate as deployed: what passes authentication reaches the
    gate's own parsing, policy and audit, with the host's gate and with the enclave's."""
    generated = case.headers or {}
    case.headers = {
        name: value
        for name, value in generated.items()
        if name.lower() != "authorization" and not name.lower().startswith("x-signd-")
    }
    response = case.call_and_validate(
        headers={"authorization": f"Bearer {BROAD_TOKEN}"}, checks=checks_for(case)
    )
    # The credential is good and nothing limits its rate: every request reaches the gate.
    assert response.status_code not in (401, 429), response.text
