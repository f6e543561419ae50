from __future__ import annotations

from pathlib import Path

import pytest

from signd.errors import ConfigurationError, InvalidField
from signd.proxy import Allowlist, Endpoint

YAML = """\
allowlist:
  - {address: kms.us-east-1.amazonaws.com, port: 443}
  - address: DB.internal
    port: 5432
  - {address: "::1", port: 8443}
"""

TOML = """\
[[allowlist]]
address = "kms.us-east-1.amazonaws.com"
port = 443

[[allowlist]]
address = "DB.internal"
port = 5432

[[allowlist]]
address = "::1"
port = 8443
"""


@pytest.fixture(params=[("allow.yaml", YAML), ("allow.yml", YAML), ("allow.toml", TOML)])
def allowlist(request: pytest.FixtureRequest, tmp_path: Path) -> Allowlist:
    name, text = request.param
    path = tmp_path / name
    path.write_text(text)
    return Allowlist.load(path)


def test_loads_every_entry(allowlist: Allowlist) -> None:
    assert [str(e) for e in allowlist] == [
        "[::1]:8443",
        "db.internal:5432",
        "kms.us-east-1.amazonaws.com:443",
    ]


@pytest.mark.parametrize(
    "text",
    [
        "kms.us-east-1.amazonaws.com:443",
        "KMS.US-EAST-1.AMAZONAWS.COM:443",
        "db.internal:5432",
        "[::1]:8443",
        "[0:0:0:0:0:0:0:1]:8443",
    ],
)
def test_allows_exact_host_and_port(allowlist: Allowlist, text: str) -> None:
    assert allowlist.allows(Endpoint.parse(text))


@pytest.mark.parametrize(
    "text",
    [
        "kms.us-east-1.amazonaws.com:444",
        "kms.us-east-2.amazonaws.com:443",
        "evil.kms.us-east-1.amazonaws.com:443",
        "kms.us-east-1.amazonaws.com.evil.com:443",
        "amazonaws.com:443",
        "db.internal:443",
        "127.0.0.1:8443",
    ],
)
def test_refuses_everything_else(allowlist: Allowlist, text: str) -> None:
    assert not allowlist.allows(Endpoint.parse(text))


def test_empty_allowlist_allows_nothing(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text("allowlist: []\n")
    allowlist = Allowlist.load(path)
    assert len(allowlist) == 0
    assert not allowlist.allows(Endpoint("localhost", 443))


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("a.yaml", ""),
        ("a.yaml", "allowlist: {address: x, port: 1}\n"),
        ("a.yaml", "allowlist:\n  - {address: x}\n"),
        ("a.yaml", "allowlist:\n  - {address: x, port: '443'}\n"),
        ("a.yaml", "allowlist:\n  - {address: x, port: 70000}\n"),
        ("a.yaml", "allowlist:\n  - {address: x, port: true}\n"),
        ("a.yaml", "allowlist:\n  - {address: 'bad host', port: 1}\n"),
        ("a.yaml", "allowlist:\n  - {address: 12, port: 1}\n"),
        ("a.yaml", "allowlist:\n  - {address: x, port: 1, proto: udp}\n"),
        ("a.yaml", "allowlist: [\n"),
        ("a.toml", "allowlist = 3\n"),
        ("a.toml", "[[allowlist]\n"),
        ("a.json", '{"allowlist": []}'),
    ],
)
def test_malformed_files_are_configuration_errors(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigurationError):
        Allowlist.load(path)


def test_missing_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        Allowlist.load(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("Example.COM:443", "example.com", 443),
        ("10.0.0.1:5432", "10.0.0.1", 5432),
        ("[2001:DB8::1]:1", "2001:db8::1", 1),
        ("a-b_c.d:65535", "a-b_c.d", 65535),
    ],
)
def test_endpoint_parse(text: str, host: str, port: int) -> None:
    endpoint = Endpoint.parse(text)
    assert (endpoint.host, endpoint.port) == (host, port)
    assert Endpoint.parse(str(endpoint)) == endpoint


@pytest.mark.parametrize(
    "text",
    [
        "",
        "example.com",
        "example.com:",
        ":443",
        "example.com:0",
        "example.com:65536",
        "example.com:+443",
        "example.com:4 43",
        "2001:db8::1:443",
        "[example.com]:443",
        "exa mple.com:443",
        "-bad.com:443",
        "bad-.com:443",
        "a..b:443",
        "é.com:443",
        ("a" * 64) + ".com:443",
        "x\n:443",
    ],
)
def test_endpoint_parse_refuses(text: str) -> None:
    with pytest.raises(InvalidField):
        Endpoint.parse(text)
