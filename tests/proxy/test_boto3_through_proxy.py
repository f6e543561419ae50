"""The real use: boto3 inside the enclave → forwarder → host proxy → KMS (moto_server)."""

from __future__ import annotations

import logging

import pytest

from signd.errors import DependencyUnavailable
from signd.kms.aws import AwsKms
from signd.proxy import Endpoint
from tests.fixtures.servers import MotoServer
from tests.proxy.conftest import TunnelFactory

pytestmark = pytest.mark.integration


def test_generate_data_key_through_the_proxy(
    moto_server: MotoServer, make_tunnel: TunnelFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="signd.proxy")
    key_id = moto_server.client("kms").create_key()["KeyMetadata"]["KeyId"]
    kms_endpoint = Endpoint("127.0.0.1", moto_server.port)
    tunnel = make_tunnel([kms_endpoint], [kms_endpoint])
    kms = AwsKms(
        key_id,
        region="us-east-1",
        endpoint_url=f"http://127.0.0.1:{tunnel.port}",
        connect_timeout=2,
        read_timeout=5,
        max_attempts=1,
    )
    context = {"key_id": "k-1"}
    data_key = kms.generate_data_key(encryption_context=context)
    assert kms.decrypt(data_key.ciphertext, encryption_context=context) == data_key.plaintext
    kms.check_health()
    kms.close()
    connected = [vars(r) for r in caplog.records if vars(r).get("event") == "proxy_connected"]
    assert connected
    assert {r["destination"] for r in connected} == {str(kms_endpoint)}


def test_kms_not_on_the_allowlist_is_unreachable(
    moto_server: MotoServer, make_tunnel: TunnelFactory
) -> None:
    kms_endpoint = Endpoint("127.0.0.1", moto_server.port)
    tunnel = make_tunnel([], [kms_endpoint])
    kms = AwsKms(
        "any", region="us-east-1", endpoint_url=f"http://127.0.0.1:{tunnel.port}", max_attempts=1
    )
    with pytest.raises(DependencyUnavailable):
        kms.generate_data_key()
