"""Several nodes: two host+enclave pairs sharing one PostgreSQL, one S3 bucket and one KMS key.

Each node is a real ``signd enclave`` process plus a host-side signer built by
``build_signer(load_settings(HOME))`` from that node's own ``signd.toml``. Node A's enclave
reaches moto_server directly; node B's reaches it only through the outbound proxy
(``signd proxy enclave`` → ``signd proxy host`` with an allowlist → moto_server), as on Nitro.
No key material lives on one node only, so any node signs any key.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from eth_account import Account

from signd.config import load_settings
from signd.custody.base import KeyInfo
from signd.enclave.client import EnclaveClient
from signd.enclave.transport import UnixTransport
from signd.errors import DependencyUnavailable
from signd.operations import Signer
from signd.operations.backends import build_signer
from tests.fixtures.servers import MotoServer, PostgresServer, free_port
from tests.integration.support import (
    SigndProcess,
    aws_tables,
    enclave_process,
    short_dir,
    start_enclave_process,
    subprocess_env,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DIGEST = b"\x5c" * 32
TRANSACTION = {
    "type": 2,
    "chainId": 1,
    "nonce": 0,
    "to": "0x3535353535353535353535353535353535353535",
    "value": 10**15,
    "gas": 21000,
    "maxFeePerGas": 30 * 10**9,
    "maxPriorityFeePerGas": 10**9,
}


@dataclass
class Node:
    name: str
    home: Path
    socket: Path
    enclave: SigndProcess
    signer: Signer

    def start_enclave(self) -> None:
        start_enclave_process(self.enclave, self.socket)

    def flush_enclave_cache(self) -> int:
        """Make the next signature on this node unseal its key again (blob read + KMS)."""
        client = EnclaveClient(UnixTransport(str(self.socket)), timeout=5.0)
        try:
            return client.flush_cache()
        finally:
            client.close()

    def listed(self) -> list[str]:
        return [key.key_id for key in self.signer.list_keys(custody="enclave", limit=1000).keys]


@dataclass
class OutboundProxy:
    """``signd proxy host`` (allowlist) + ``signd proxy enclave`` (one route to moto)."""

    home: Path
    allowlist: Path
    socket: Path
    local_port: int
    moto_port: int
    env: dict[str, str]
    host: SigndProcess | None = None
    forwarder: SigndProcess | None = None
    starts: int = 0

    def start_host(self, allowed: list[tuple[str, int]]) -> None:
        """(Re)start the host proxy with exactly ``allowed`` on its allowlist."""
        entries = "".join(f"  - {{address: {host}, port: {port}}}\n" for host, port in allowed)
        self.allowlist.write_text("allowlist:\n" + entries)
        if self.host is not None:
            self.host.stop()
        self.starts += 1
        self.host = SigndProcess(
            self.home,
            "proxy",
            "host",
            "--allowlist",
            str(self.allowlist),
            "--listen",
            f"unix://{self.socket}",
            log=self.home / f"proxy-host-{self.starts}.log",
            env=self.env,
        )
        host = self.host
        host.start(lambda: "host proxy listening" in host.log_text())

    def start_forwarder(self) -> None:
        self.forwarder = SigndProcess(
            self.home,
            "proxy",
            "enclave",
            "--route",
            f"{self.local_port}:127.0.0.1:{self.moto_port}",
            "--proxy",
            f"unix://{self.socket}",
            log=self.home / "proxy-enclave.log",
            env=self.env,
        )
        forwarder = self.forwarder
        forwarder.start(lambda: f"forwarding 127.0.0.1:{self.local_port}" in forwarder.log_text())

    def host_log(self) -> str:
        return self.host.log_text() if self.host is not None else ""

    def stop(self) -> None:
        for process in (self.forwarder, self.host):
            if process is not None:
                process.stop()


@dataclass
class Cluster:
    a: Node
    b: Node
    proxy: OutboundProxy
    moto: MotoServer


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    moto_server: MotoServer,
    postgres_server: PostgresServer,
) -> Iterator[Cluster]:
    key_id = moto_server.client("kms").create_key()["KeyMetadata"]["KeyId"]
    bucket = "signd-nodes-" + secrets.token_hex(4)
    moto_server.client("s3").create_bucket(Bucket=bucket)
    dsn = postgres_server.create_schema()
    env = subprocess_env()
    base = tmp_path_factory.mktemp("nodes")
    processes: list[SigndProcess] = []
    signers: list[Signer] = []
    with short_dir() as run:
        proxy = OutboundProxy(
            home=base / "b",
            allowlist=base / "allowlist.yaml",
            socket=run / "proxy.sock",
            local_port=free_port(),
            moto_port=moto_server.port,
            env=env,
        )
        nodes = []
        try:
            for name, endpoint in [
                ("a", moto_server.endpoint_url),
                ("b", f"http://127.0.0.1:{proxy.local_port}"),
            ]:
                home, socket = base / name, run / f"enclave-{name}.sock"
                tables = aws_tables(
                    kms_endpoint=endpoint,
                    key_id=key_id,
                    s3_endpoint=endpoint,
                    bucket=bucket,
                    dsn=dsn,
                )
                tables["enclave"] = {"transport": f"unix://{socket}", "timeout": 10}
                tables["custody"] = {"enabled": ["enclave"]}
                write_config(home, tables)
                process = enclave_process(home, socket, env=env)
                processes.append(process)
                signer = build_signer(load_settings(home))
                signers.append(signer)
                nodes.append(Node(name, home, socket, process, signer))
            proxy.start_host([("127.0.0.1", moto_server.port)])
            proxy.start_forwarder()
            for node in nodes:
                node.start_enclave()
            yield Cluster(nodes[0], nodes[1], proxy, moto_server)
        finally:
            for signer in signers:
                signer.close()
            for process in processes:
                process.stop()
            proxy.stop()


def check_signs(node: Node, key: KeyInfo) -> None:
    signature = node.signer.sign_hash(key.key_id, DIGEST)
    assert signature.recover_public_key(DIGEST) == key.public_key
    signed = node.signer.sign_eth_transaction(key.address, TRANSACTION)
    assert Account.recover_transaction(signed.raw) == key.address


def test_keys_created_on_one_node_sign_on_the_other(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    from_a = a.signer.create_keys(chain="ethereum", custody="enclave", count=3)
    from_b = b.signer.create_keys(chain="ethereum", custody="enclave", count=2)
    for key in from_a:
        check_signs(b, key)
        assert b.signer.get_key(key.address) == key
    for key in from_b:
        check_signs(a, key)
        assert a.signer.get_key(key.key_id) == key
    # the same RFC 6979 signature from either node
    assert a.signer.sign_hash(from_b[0].key_id, DIGEST) == b.signer.sign_hash(
        from_b[0].key_id, DIGEST
    )
    assert f"proxy connected to 127.0.0.1:{cluster.proxy.moto_port}" in cluster.proxy.host_log()


def test_lists_agree_and_cursors_work_on_either_node(cluster: Cluster) -> None:
    cluster.a.signer.create_keys(chain="ethereum", custody="enclave", count=3)
    cluster.b.signer.create_keys(chain="ethereum", custody="enclave", count=3)
    everything = cluster.a.listed()
    assert len(everything) >= 6
    assert cluster.b.listed() == everything
    first = cluster.a.signer.list_keys(custody="enclave", limit=4)
    rest = cluster.b.signer.list_keys(custody="enclave", cursor=first.next_cursor, limit=1000)
    assert [key.key_id for key in [*first.keys, *rest.keys]] == everything


def test_killing_one_enclave_leaves_the_other_serving(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    from_a = a.signer.create_keys(chain="ethereum", custody="enclave", count=2)
    a.enclave.kill()
    try:
        with pytest.raises(DependencyUnavailable):
            a.signer.sign_hash(from_a[0].key_id, DIGEST)
        b.flush_enclave_cache()
        for key in from_a:
            check_signs(b, key)
        [from_b] = b.signer.create_keys(chain="ethereum", custody="enclave")
        check_signs(b, from_b)
        assert a.listed() == b.listed()  # listing is the host's and the database's job
    finally:
        a.start_enclave()
    check_signs(a, from_b)  # the same host-side signer reconnects to the restarted enclave


def test_outbound_proxy_allowlist_decides_what_the_enclave_reaches(cluster: Cluster) -> None:
    a, b, proxy = cluster.a, cluster.b, cluster.proxy
    [key] = a.signer.create_keys(chain="ethereum", custody="enclave")
    enclave_pid = b.enclave.pid
    proxy.start_host([("kms.us-east-1.amazonaws.com", 443)])
    try:
        b.flush_enclave_cache()
        started = time.monotonic()
        with pytest.raises(DependencyUnavailable) as cold_sign:
            b.signer.sign_hash(key.key_id, DIGEST)
        with pytest.raises(DependencyUnavailable) as create:
            b.signer.create_keys(chain="ethereum", custody="enclave")
        assert time.monotonic() - started < 8.0
        for caught in (cold_sign, create):
            assert caught.value.http_status == 503
            assert caught.value.code == "dependency_unavailable"
        assert "S3" in cold_sign.value.message
        assert "KMS" in create.value.message
        assert f"127.0.0.1:{proxy.moto_port}: not_allowlisted" in proxy.host_log()
        check_signs(a, key)  # node A does not go through that proxy
    finally:
        proxy.start_host([("127.0.0.1", proxy.moto_port)])
    check_signs(b, key)
    assert b.enclave.pid == enclave_pid  # recovered without restarting the enclave
