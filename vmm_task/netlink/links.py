"""UpdateInterfaces: configure the links the host plugged in, found by MAC address.

Each netlink request is a round of pyroute2 encoding and parsing, most of a clone pod's network
configuration under TCG (docs/templates.md): one dump of the links serves finding the link
and the name to move aside, a link already down is not set down again, and its
name, MTU, ARP flag and up state go in one request (the kernel renames and sets the MTU before it
changes the flags: rtnetlink.c do_setlink)."""

import socket

from vmm_task.netlink import open_iproute
from vmm_task.netlink.errors import NetworkConfigError

IFF_UP = 0x1
IFF_NOARP = 0x80


def parse_prefix(address: str, mask: str) -> tuple[str, int, int]:
    """(address, prefix length, family) from Kuasar's IPAddress: mask is a prefix length
    ("24") or, for IPv4, a dotted netmask ("255.255.255.0")."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(address)
        if mask.isdigit():
            prefix = int(mask)
            ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
        else:
            prefix = ipaddress.ip_network(f"0.0.0.0/{mask}").prefixlen
    except ValueError as e:
        raise NetworkConfigError(f"invalid address {address}/{mask}: {e}") from None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return str(ip), prefix, family


async def update_interfaces(interfaces) -> None:
    """Apply each `grpc.Interface` in order; raises NetworkConfigError naming the interface."""

    async with open_iproute() as ipr:
        for interface in interfaces:
            try:
                await _update_one(ipr, interface)
            except NetworkConfigError:
                raise
            except Exception as e:  # NetlinkError and friends: say which interface and why
                raise NetworkConfigError(
                    f"interface {interface.name or interface.hwAddr}: {e}") from None


async def _update_one(ipr, interface) -> None:
    addresses = [parse_prefix(a.address, a.mask) for a in interface.IPAddresses]
    links = [link async for link in await ipr.link("dump")]
    link = _find_link(links, interface)
    index = link["index"]
    if link["flags"] & IFF_UP:  # renaming needs it down; a NIC just plugged is
        await ipr.link("set", index=index, state="down")
    await ipr.flush_addr(index=index)
    for address, prefix, family in addresses:
        await ipr.addr("add", index=index, address=address, prefixlen=prefix, family=family)
    current_name = link.get("IFLA_IFNAME")
    if interface.name and interface.name != current_name:
        await _move_aside(ipr, links, interface.name)
    changes = {"ifname": interface.name or current_name}
    if interface.mtu:
        changes["mtu"] = interface.mtu
    noarp = interface.raw_flags & IFF_NOARP
    await ipr.link("set", index=index, flags=noarp | IFF_UP, mask=IFF_NOARP | IFF_UP, **changes)


def _find_link(links, interface):
    if interface.hwAddr:
        wanted = interface.hwAddr.lower()
        found = [link for link in links if (link.get("IFLA_ADDRESS") or "").lower() == wanted]
        what = f"MAC {interface.hwAddr}"
    else:
        names = {interface.device, interface.name} - {""}
        found = [link for link in links if link.get("IFLA_IFNAME") in names]
        what = f"name {' or '.join(sorted(names)) or '(none given)'}"
    if not found:
        raise NetworkConfigError(f"no link with {what}", not_found=True)
    return found[0]


async def _move_aside(ipr, links, name: str) -> None:
    """Another link already has the name we must give (in `links`, the dump the link was found
    in): rename it to <name>-tmp (the host's order of plugging may differ from the guest
    kernel's eth numbering)."""
    for other in links:
        if other.get("IFLA_IFNAME") == name:
            await ipr.link("set", index=other["index"], ifname=f"{name}-tmp"[:15])
