"""The enclave's outbound path: TCP forwarders inside, an allowlisting proxy on the host.

Enclave code connects to ``127.0.0.1:PORT``; the :mod:`enclave_forwarder` carries the
connection over a Unix socket or vsock to the :mod:`host_proxy`, which checks the destination
against the :class:`Allowlist` and connects to it.
"""

from signd.proxy.address import ProxyAddress, UnixAddress, VsockAddress, parse_address
from signd.proxy.allowlist import Allowlist, Endpoint
from signd.proxy.enclave_forwarder import EnclaveForwarder, Route, run_enclave_forwarders
from signd.proxy.host_proxy import HostProxy, run_host_proxy
from signd.proxy.splice import ProxyTimeouts

__all__ = [
    "Allowlist",
    "EnclaveForwarder",
    "Endpoint",
    "HostProxy",
    "ProxyAddress",
    "ProxyTimeouts",
    "Route",
    "UnixAddress",
    "VsockAddress",
    "parse_address",
    "run_enclave_forwarders",
    "run_host_proxy",
]
