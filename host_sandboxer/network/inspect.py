"""What the CNI made in the pod's network namespace: the links the VM takes over, their
addresses and the routes through them.

Pure reading (called with a pyroute2 IPRoute opened inside the namespace); what may be taken
over is decided here: veth pairs (what CNI plugins make) and plain ethernet devices (no
netlink kind, e.g. a NIC moved into the namespace).  Loopback stays; any other kind is refused
before anything is changed.
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from host_sandboxer.network.errors import NetworkError

SUPPORTED_KINDS = ("veth", "")  # "" = a plain device: no IFLA_LINKINFO kind
IFF_LOOPBACK = 0x8
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RT_SCOPE_LINK = 253
RTNH_F_ONLINK = 4  # the one rtm_flag a route request may carry; the others are the kernel's state


@dataclass(frozen=True)
class PodAddress:
    address: str
    prefixlen: int
    family: int  # socket.AF_INET or AF_INET6


@dataclass(frozen=True)
class PodLink:
    index: int
    name: str
    kind: str
    mac: str
    mtu: int
    flags: int
    addresses: tuple[PodAddress, ...]


@dataclass(frozen=True)
class PodRoute:
    dest: str  # "" = default
    gateway: str
    device: str
    source: str
    scope: int
    family: int
    flags: int = 0  # rtm_flags: RTNH_F_ONLINK or 0


@dataclass(frozen=True)
class PodNetwork:
    links: tuple[PodLink, ...]
    routes: tuple[PodRoute, ...]


def read_network(ipr, netns_path: str) -> PodNetwork:
    """The links to take over (NetworkError naming any unsupported one) and their routes."""
    links = []
    for link in ipr.get_links():
        if link["flags"] & IFF_LOOPBACK:
            continue
        name = link.get("IFLA_IFNAME")
        kind = link.get(("IFLA_LINKINFO", "IFLA_INFO_KIND")) or ""
        if kind not in SUPPORTED_KINDS:
            raise NetworkError(f"network namespace {netns_path}: interface {name} is of type "
                               f"{kind}; only veth and plain ethernet interfaces are supported")
        links.append(PodLink(index=link["index"], name=name, kind=kind,
                             mac=link.get("IFLA_ADDRESS"), mtu=link.get("IFLA_MTU"),
                             flags=link["flags"], addresses=_addresses(ipr, link["index"])))
    names = {link.index: link.name for link in links}
    routes = tuple(route for family in (socket.AF_INET, socket.AF_INET6)
                   for route in _routes(ipr, family, names))
    return PodNetwork(tuple(links), routes)


def _addresses(ipr, index: int) -> tuple[PodAddress, ...]:
    """Global addresses (the guest kernel makes its own link-local ones from the same MAC)."""
    return tuple(PodAddress(a.get("IFA_ADDRESS"), a["prefixlen"], a["family"])
                 for a in ipr.get_addr(index=index) if a["scope"] != RT_SCOPE_LINK)


def _routes(ipr, family: int, names: dict[int, str]):
    for route in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
        oif = route.get("RTA_OIF")
        dest = route.get("RTA_DST")
        if route["type"] != RTN_UNICAST or route.get("RTA_TABLE", RT_TABLE_MAIN) != RT_TABLE_MAIN:
            continue
        if oif not in names or (dest and ipaddress.ip_address(dest).is_link_local):
            continue  # not through a link we take over; or IPv6 fe80::/64, made by the guest
        yield PodRoute(dest=f"{dest}/{route['dst_len']}" if dest else "",
                       gateway=route.get("RTA_GATEWAY") or "", device=names[oif],
                       source=route.get("RTA_PREFSRC") or "", scope=route["scope"], family=family,
                       flags=route["flags"] & RTNH_F_ONLINK)
