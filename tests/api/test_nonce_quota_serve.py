"""``[api] nonce_quota`` in signd.toml reaches the gate of a running ``signd serve``: the one
in its own process (keystore custody) and the one in the enclave process it starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from signd.client import SigndClient
from signd.gate.errors import Unauthenticated
from tests.api.conftest import make_home
from tests.api.processes import signd_serve

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("custody", ["keystore", "enclave"])
def test_serve_refuses_a_client_past_its_nonce_quota(tmp_path: Path, custody: str) -> None:
    home = make_home(tmp_path / "home", (custody,), extra="\n[api]\nnonce_quota = 2\n")
    with signd_serve(home, provision=False) as server:
        client = SigndClient(server.url, "dev", str(home / "dev-client.key"))
        try:
            for _ in range(2):
                client.list_keys(custody=custody)
            with pytest.raises(Unauthenticated, match="too many requests in the time window"):
                client.list_keys(custody=custody)
        finally:
            client.close()
        assert server.stop() == 0
        log = server.log.read_text()
    assert ("gate: in the enclave" in log) == (custody == "enclave")
    assert "Traceback" not in log
