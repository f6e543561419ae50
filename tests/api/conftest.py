"""Fixtures for the service tests: a signer over a throwaway keystore and in-process clients."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():  # starlette 1.x prefers httpx2; httpx is what is installed
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

from signd.api import ApiSettings, allow_anonymous_for_tests, create_app
from signd.config import load_settings
from signd.crypto.secret import Secret
from signd.operations import Signer
from signd.operations.backends import build_signer

PASSPHRASE = "api tests: correct horse battery staple"

ClientFactory = Callable[..., TestClient]


def make_home(path: Path, custody: tuple[str, ...] = ("keystore",), extra: str = "") -> Path:
    """A signd home with a cheap-scrypt keystore and only the given custody types."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "signd.toml").write_text(
        f"[keystore]\nscrypt_n = 1024\n\n[custody]\nenabled = {json.dumps(list(custody))}\n{extra}"
    )
    return path


def open_signer(home: Path) -> Signer:
    return build_signer(load_settings(home), passphrase=lambda creating: Secret(PASSPHRASE))


@pytest.fixture
def signer(tmp_path: Path) -> Iterator[Signer]:
    with open_signer(make_home(tmp_path / "home")) as opened:
        yield opened


@pytest.fixture
def make_client(signer: Signer) -> Iterator[ClientFactory]:
    """Start apps (lifespan included) over ``signer`` or another one; all stop at teardown.
    Without an ``authenticate`` argument the app runs in the no-authentication test mode."""
    with ExitStack() as stack:

        def factory(
            settings: ApiSettings | None = None, *, over: Signer | None = None, **kwargs: Any
        ) -> TestClient:
            kwargs.setdefault("authenticate", allow_anonymous_for_tests)
            app = create_app(over or signer, settings, **kwargs)
            return stack.enter_context(TestClient(app))

        yield factory


@pytest.fixture
def client(make_client: ClientFactory) -> TestClient:
    return make_client()


@pytest.fixture
def eth_key(client: TestClient) -> dict[str, Any]:
    response = client.post("/v1/keys", json={"chain": "ethereum", "custody": "keystore"})
    assert response.status_code == 201
    key: dict[str, Any] = response.json()["keys"][0]
    return key


from tests.gate.support import gate_mode, gated, hot_key  # noqa: E402, F401 - the gated service
