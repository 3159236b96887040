"""UpdateInterfaces / UpdateRoutes with pyroute2 in a fresh network namespace (root).

A veth pair stands in for the NIC the host hot-plugs; it lives in a namespace of a forked child
(test_agent_reaper.in_child), so the host's network is never touched.
"""

import os
import socket

import pytest

from test_agent_reaper import in_child

from vmm_common.protos.kuasar import sandbox_pb2 as pb
from vmm_task.init import syscalls as sc
from vmm_task.netlink.errors import NetworkConfigError
from vmm_task.netlink.links import IFF_NOARP, parse_prefix, update_interfaces
from vmm_task.netlink.routes import update_routes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespace)")
MAC = "02:00:00:aa:bb:01"


async def make_nic(ipr) -> int:
    """A veth named like a fresh guest NIC (eth0) with the MAC the host reports."""
    await ipr.link("add", ifname="eth0", kind="veth", peer="peer0")
    index = (await ipr.link_lookup(ifname="eth0"))[0]
    await ipr.link("set", index=index, address=MAC)
    await ipr.link("set", index=(await ipr.link_lookup(ifname="peer0"))[0], state="up")
    return index


def pod_interface(**changes) -> pb.Interface:
    fields = dict(name="pod0", hwAddr=MAC.upper(), mtu=1400, IPAddresses=[
        pb.IPAddress(family=pb.v4, address="10.88.0.5", mask="24"),
        pb.IPAddress(family=pb.v6, address="fd00::5", mask="64")])
    return pb.Interface(**{**fields, **changes})


def test_interface_found_by_mac_renamed_addressed_and_up_then_routes():
    async def body(_reaper):
        from pyroute2 import AsyncIPRoute

        sc.unshare(sc.CLONE_NEWNET)
        async with AsyncIPRoute() as ipr:
            index = await make_nic(ipr)
            await update_interfaces([pod_interface()])
            link = (await ipr.link("get", index=index))[0]
            addresses = sorted([(a.get("IFA_ADDRESS"), a["prefixlen"])
                                async for a in await ipr.addr("dump", index=index)
                                if not a.get("IFA_ADDRESS").startswith("fe80")])
            await update_routes([
                pb.Route(dest="default", gateway="10.88.0.1", device="pod0"),
                pb.Route(dest="10.99.0.0/16", device="pod0", scope=253),
            ])
            first = await _routes(ipr)
            await update_routes([pb.Route(dest="", gateway="10.88.0.254", device="pod0")])
            second = await _routes(ipr)
        return (link.get("IFLA_IFNAME"), link.get("IFLA_MTU"), bool(link["flags"] & 1),
                addresses, first, second)

    name, mtu, up, addresses, first, second = in_child(body)
    assert (name, mtu, up) == ("pod0", 1400, True)
    assert addresses == [("10.88.0.5", 24), ("fd00::5", 64)]
    assert ("0.0.0.0/0", "10.88.0.1") in first and ("10.99.0.0/16", None) in first
    # the address's own link route (proto kernel) survives; our earlier routes are replaced
    assert ("10.88.0.0/24", None) in second
    assert ("0.0.0.0/0", "10.88.0.254") in second and ("10.99.0.0/16", None) not in second


async def _routes(ipr) -> list:
    return [(f"{r.get('RTA_DST') or '0.0.0.0'}/{r['dst_len']}", r.get("RTA_GATEWAY"))
            async for r in await ipr.route("dump", family=socket.AF_INET, table=254)]


def test_onlink_gateway_outside_every_subnet_is_routed():
    """Calico's shape: a /32 pod address and a default route via 169.254.1.1 onlink; without
    the route's flags (Kuasar's field 7) the kernel refuses it (ENETUNREACH)."""
    async def body(_reaper):
        from pyroute2 import AsyncIPRoute

        sc.unshare(sc.CLONE_NEWNET)
        async with AsyncIPRoute() as ipr:
            await make_nic(ipr)
            await update_interfaces([pod_interface(IPAddresses=[
                pb.IPAddress(family=pb.v4, address="10.88.0.5", mask="32")])])
            default = pb.Route(dest="", gateway="169.254.1.1", device="pod0")
            try:
                await update_routes([default])
                refused = ""
            except NetworkConfigError as e:
                refused = str(e)
            default.flags = 4  # RTNH_F_ONLINK
            await update_routes([default])
            routes = [(r.get("RTA_GATEWAY"), r["flags"] & 4)
                      async for r in await ipr.route("dump", family=socket.AF_INET, table=254)]
        return refused, routes

    refused, routes = in_child(body)
    assert "169.254.1.1" in refused and "unreachable" in refused.lower(), refused
    assert ("169.254.1.1", 4) in routes


def test_name_taken_by_another_link_is_moved_aside_and_noarp_applied():
    async def body(_reaper):
        from pyroute2 import AsyncIPRoute

        sc.unshare(sc.CLONE_NEWNET)
        async with AsyncIPRoute() as ipr:
            await make_nic(ipr)
            await ipr.link("add", ifname="pod0", kind="veth", peer="peer1")
            await update_interfaces([pod_interface(IPAddresses=[], raw_flags=IFF_NOARP)])
            names = sorted([link.get("IFLA_IFNAME") async for link in await ipr.link("dump")])
            flags = (await ipr.link("get", ifname="pod0"))[0]["flags"]
        return names, bool(flags & IFF_NOARP)

    assert in_child(body) == (["lo", "peer0", "peer1", "pod0", "pod0-tmp"], True)


def test_unknown_mac_and_bad_route_device_are_not_found():
    async def body(_reaper):
        sc.unshare(sc.CLONE_NEWNET)
        errors = []
        for call in (update_interfaces([pod_interface(hwAddr="02:00:00:00:00:99")]),
                     update_routes([pb.Route(dest="10.1.0.0/16", device="nope0")])):
            try:
                await call
            except NetworkConfigError as e:
                errors.append((e.not_found, str(e)))
        return errors

    (mac_missing, mac_message), (dev_missing, dev_message) = in_child(body)
    assert mac_missing and "no link with MAC 02:00:00:00:00:99" in mac_message
    assert dev_missing and "no link named nope0" in dev_message


class CountingIPRoute:
    """The real AsyncIPRoute, each request recorded as "<method> <command>" (the kernel answers:
    only the count is observed)."""

    def __init__(self, sent: list):
        from pyroute2 import AsyncIPRoute

        self.ipr, self.sent = AsyncIPRoute(), sent

    async def __aenter__(self):
        await self.ipr.__aenter__()
        return self

    async def __aexit__(self, *exc):
        return await self.ipr.__aexit__(*exc)

    def __getattr__(self, name):
        method = getattr(self.ipr, name)

        async def recorded(*args, **kwargs):
            self.sent.append(" ".join([name, *map(str, args[:1])]))
            return await method(*args, **kwargs)
        return recorded


def test_a_fresh_nic_takes_five_requests_and_two_routes_four(monkeypatch):
    """Each request is a round of pyroute2, most of a clone pod's network set-up under TCG: a
    plugged NIC (down) is not set down, its name, MTU and up state go in one request; the routes
    take one dump of both families and one of the links, however many routes name a device. The
    IPv6 route of an earlier UpdateRoutes is still removed by that one dump."""
    from vmm_task.netlink import links, routes

    async def body(_reaper):
        from pyroute2 import AsyncIPRoute

        sent = []
        monkeypatch.setattr(links, "open_iproute", lambda: CountingIPRoute(sent))
        monkeypatch.setattr(routes, "open_iproute", lambda: CountingIPRoute(sent))
        sc.unshare(sc.CLONE_NEWNET)
        async with AsyncIPRoute() as ipr:
            await make_nic(ipr)
            await update_interfaces([pod_interface()])
            interfaces_sent, sent[:] = list(sent), []
            await update_routes([pb.Route(dest="default", gateway="10.88.0.1", device="pod0"),
                                 pb.Route(dest="fd01::/64", device="pod0", family=pb.v6, scope=253)])
            routes_sent = list(sent)
            await update_routes([pb.Route(dest="10.99.0.0/16", device="pod0", scope=253)])
            left = sorted([f"{r.get('RTA_DST') or 'default'}/{r['dst_len']}"
                           async for r in await ipr.route("dump", family=socket.AF_UNSPEC, table=254)
                           if r["proto"] == 3])  # RTPROT_BOOT: ours
        return interfaces_sent, routes_sent, left

    interfaces_sent, routes_sent, left = in_child(body)
    assert interfaces_sent == ["link dump", "flush_addr", "addr add", "addr add", "link set"]
    assert routes_sent == ["route dump", "link dump", "route replace", "route replace"]
    assert left == ["10.99.0.0/16"]


def test_address_parsing():
    assert parse_prefix("10.0.0.1", "255.255.255.0") == ("10.0.0.1", 24, socket.AF_INET)
    assert parse_prefix("fd00::1", "64") == ("fd00::1", 64, socket.AF_INET6)
    with pytest.raises(NetworkConfigError, match="invalid address 10.0.0.1/33"):
        parse_prefix("10.0.0.1", "33")
    with pytest.raises(NetworkConfigError, match="invalid address"):
        parse_prefix("not-an-ip", "24")
