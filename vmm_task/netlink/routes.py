"""UpdateRoutes: replace the main routing table with the host's routes (as Kuasar and Kata do).

One dump of both families' routes and at most one of the links (for every route's device),
whatever the number of routes: each request is a round of pyroute2 under TCG."""

import socket

from vmm_task.netlink import open_iproute
from vmm_task.netlink.errors import NetworkConfigError

RT_TABLE_MAIN = 254
RTPROT_KERNEL = 2   # routes the kernel derives from addresses: kept
RTPROT_BOOT = 3
RTNH_F_ONLINK = 4
IPV6 = 1            # grpc.IPFamily.v6


async def update_routes(routes) -> None:
    """Delete our earlier routes of the main table, then add `routes` (each a grpc.Route), the
    ones without gateway first so gateways are reachable when their routes are added."""

    ordered = sorted(routes, key=lambda r: bool(r.gateway))
    async with open_iproute() as ipr:
        await _remove_our_routes(ipr)
        indexes = await _link_indexes(ipr) if any(route.device for route in ordered) else {}
        for route in ordered:
            request = _request(indexes, route)
            try:
                await ipr.route("replace", **request)
            except Exception as e:
                raise NetworkConfigError(f"route {_describe(route)}: {e}") from None


async def _remove_our_routes(ipr) -> None:
    """Every main-table route except those the kernel derived from addresses."""
    old_routes = [route async for route in await ipr.route("dump", family=socket.AF_UNSPEC, table=RT_TABLE_MAIN)
                  if route["family"] in (socket.AF_INET, socket.AF_INET6)
                  and route["proto"] != RTPROT_KERNEL
                  and route.get("RTA_TABLE") == RT_TABLE_MAIN]
    for old in old_routes:
        try:
            await ipr.route("del", **_identity(old))
        except Exception as e:
            raise NetworkConfigError(
                f"cannot remove the old route {old.get('RTA_DST') or 'default'}"
                f"/{old['dst_len']}: {e}") from None


async def _link_indexes(ipr) -> dict[str, int]:
    return {link.get("IFLA_IFNAME"): link["index"] async for link in await ipr.link("dump")}


def _identity(route) -> dict:
    request = {"family": route["family"], "table": RT_TABLE_MAIN, "dst_len": route["dst_len"],
               "scope": route["scope"], "proto": route["proto"]}
    for nla, key in (("RTA_DST", "dst"), ("RTA_GATEWAY", "gateway"), ("RTA_OIF", "oif")):
        if route.get(nla) is not None:
            request[key] = route.get(nla)
    return request


def _request(indexes: dict[str, int], route) -> dict:
    family = socket.AF_INET6 if route.family == IPV6 else socket.AF_INET
    request = {"family": family, "table": RT_TABLE_MAIN, "proto": RTPROT_BOOT,
               "scope": route.scope, "dst": route.dest or "default"}
    if route.device:
        if route.device not in indexes:
            raise NetworkConfigError(f"route {_describe(route)}: no link named {route.device}",
                                     not_found=True)
        request["oif"] = indexes[route.device]
    if route.gateway:
        request["gateway"] = route.gateway
    if route.flags & RTNH_F_ONLINK:  # rtm_flags (Kuasar's field 7); the kernel refuses its
        request["flags"] = RTNH_F_ONLINK  # own state flags (dead, linkdown) in a request
    if route.source:
        request["prefsrc"] = route.source.split("/")[0]
    return request


def _describe(route) -> str:
    via = f" via {route.gateway}" if route.gateway else ""
    dev = f" dev {route.device}" if route.device else ""
    onlink = " onlink" if route.flags & RTNH_F_ONLINK else ""
    return f"{route.dest or 'default'}{via}{dev}{onlink}"
