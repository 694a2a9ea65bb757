"""Which network interfaces discovery uses, and which addresses a worker announces on them.

mDNS is link-local: a record announced on an interface must carry an address
reachable on that link. So a worker bound to one address announces that one;
a worker bound to 0.0.0.0 announces one concrete address per chosen interface
(never 0.0.0.0, which means nothing to a peer); a worker bound to loopback
uses no mDNS unless interfaces are named (then it announces on those).
Only IPv4 is announced.
"""
from __future__ import annotations

import ipaddress
from functools import lru_cache
from urllib.parse import urlsplit

import ifaddr

WILDCARD_HOSTS = frozenset({"0.0.0.0", "*", ""})
LOOPBACK = "127.0.0.1"


class InterfaceError(ValueError):
    """An interface name or address that this machine does not have."""


def ipv4_interfaces() -> list[tuple[str, ipaddress.IPv4Interface]]:
    """(name, address/prefix) of every IPv4 address of this host (this network namespace)."""
    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if ip.is_IPv4:
                out.append((adapter.nice_name, ipaddress.IPv4Interface(f"{ip.ip}/{ip.network_prefix}")))
    return out


def resolve(interfaces: list[str] | None, bind_host: str | None = None) -> list[str]:
    """The IPv4 addresses discovery runs on.

    `interfaces` names interfaces ("eth0") or addresses; when empty: the bound
    address if the worker is bound to one, else every non-loopback interface
    (loopback when there is none).
    """
    local = ipv4_interfaces()
    if interfaces:
        out = []
        for item in interfaces:
            if _is_ipv4(item):
                out.append(item)
                continue
            addrs = [str(i.ip) for name, i in local if name == item]
            if not addrs:
                raise InterfaceError(f"no IPv4 interface named {item!r}; this host has "
                                     f"{', '.join(sorted({n for n, _ in local}))}")
            out += addrs
        return list(dict.fromkeys(out))
    if bind_host and bind_host not in WILDCARD_HOSTS and _is_ipv4(bind_host):
        return [bind_host]
    outside = [str(i.ip) for _, i in local if not i.ip.is_loopback]
    return outside or [LOOPBACK]


def announces_by_default(bind_host: str | None) -> bool:
    """Whether a worker bound to `bind_host` uses mDNS when no interfaces are named.

    Not when bound to loopback: only this host can reach it, and announcing on
    `lo` would join unrelated local swarms (tests, demos) into one by gossip.
    """
    return not (bind_host and _is_ipv4(bind_host) and ipaddress.IPv4Address(bind_host).is_loopback)


def announce_endpoints(bound: str, addresses: list[str], public_host: str | None = None) -> list[str]:
    """Where peers should reach a worker bound at `bound` (e.g. tcp://0.0.0.0:31337)."""
    parts = urlsplit(bound)
    if public_host:
        return [f"{parts.scheme}://{public_host}:{parts.port}"]
    if parts.hostname in WILDCARD_HOSTS:
        return [f"{parts.scheme}://{a}:{parts.port}" for a in addresses]
    return [bound]


def host_of(endpoint: str) -> str:
    return urlsplit(endpoint).hostname or ""


@lru_cache(maxsize=1)
def _local_networks() -> tuple[ipaddress.IPv4Network, ...]:
    return tuple(i.network for _, i in ipv4_interfaces())


def order_endpoints(endpoints: tuple[str, ...]) -> tuple[str, ...]:
    """Endpoints on a network this host is attached to first: those are the ones likely to answer."""

    def remote(endpoint: str) -> bool:
        host = host_of(endpoint)
        if not _is_ipv4(host):
            return True
        address = ipaddress.IPv4Address(host)
        return not any(address in net for net in _local_networks())

    return tuple(sorted(endpoints, key=remote))


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
        return True
    except ValueError:
        return False
