"""Where the enclave may connect: ``host:port`` endpoints and the allowlist that names them.

The file shape is vsock-proxy's::

    allowlist:
      - {address: kms.us-east-1.amazonaws.com, port: 443}

in YAML (``.yaml``/``.yml``) or the same in TOML (``[[allowlist]]`` tables). Matching is
exact: the host compared case-insensitively, the port equal. No DNS, no wildcards.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import yaml

from signd.errors import ConfigurationError, InvalidField

_HOST_LABEL: Final = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A validated ``host:port``: the host lower-cased (an IP address in its canonical form,
    IPv6 without brackets)."""

    host: str
    port: int

    def __post_init__(self) -> None:
        host = self.host.lower()
        if _is_ip(host):
            host = str(ipaddress.ip_address(host))
        elif not _is_hostname(host):
            raise InvalidField("not a valid host name or IP address", field="host")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise InvalidField("port must be an integer", field="port")
        if not 0 < self.port < 65536:
            raise InvalidField("port must be between 1 and 65535", field="port")
        object.__setattr__(self, "host", host)

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """``host:port`` or ``[v6-address]:port``."""
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or len(port) > 5:
            raise InvalidField("expected host:port", field="destination")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            if not _is_ip(host):
                raise InvalidField("only an IPv6 address may be bracketed", field="destination")
        elif ":" in host:
            raise InvalidField("an IPv6 address must be bracketed", field="destination")
        return cls(host, int(port))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class Allowlist:
    """The set of endpoints the host proxy will connect to."""

    def __init__(self, endpoints: Iterable[Endpoint]) -> None:
        self._endpoints = frozenset(endpoints)

    @classmethod
    def from_mapping(cls, document: object) -> Allowlist:
        """Build from ``{"allowlist": [{"address": ..., "port": ...}, ...]}``."""
        entries = document.get("allowlist") if isinstance(document, Mapping) else None
        if not isinstance(entries, list):
            raise ConfigurationError("the allowlist file needs an 'allowlist' list")
        endpoints = []
        for index, entry in enumerate(entries):
            if not isinstance(entry, Mapping) or set(entry) != {"address", "port"}:
                raise ConfigurationError(
                    f"allowlist entry {index} must have exactly 'address' and 'port'"
                )
            if not isinstance(entry["address"], str):
                raise ConfigurationError(f"allowlist entry {index}: address must be a string")
            try:
                endpoints.append(Endpoint(entry["address"], entry["port"]))
            except InvalidField as exc:
                raise ConfigurationError(f"allowlist entry {index}: {exc.message}") from None
        return cls(endpoints)

    @classmethod
    def load(cls, path: Path) -> Allowlist:
        """Read a YAML or TOML allowlist file, chosen by its suffix."""
        suffix = path.suffix.lower()
        try:
            text = path.read_text(encoding="utf-8")
            if suffix in (".yaml", ".yml"):
                document = yaml.safe_load(text)
            elif suffix == ".toml":
                document = tomllib.loads(text)
            else:
                raise ConfigurationError(f"allowlist {path} must be .yaml, .yml or .toml")
        except (OSError, UnicodeDecodeError, yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
            raise ConfigurationError(f"cannot read allowlist {path}: {exc}") from exc
        return cls.from_mapping(document)

    def allows(self, endpoint: Endpoint) -> bool:
        return endpoint in self._endpoints

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(sorted(self._endpoints, key=str))

    def __len__(self) -> int:
        return len(self._endpoints)

    def __repr__(self) -> str:
        return f"Allowlist({', '.join(str(e) for e in self)})"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_hostname(host: str) -> bool:
    name = host.removesuffix(".")
    return 0 < len(name) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in name.split("."))
