"""UpdateInterfaces: configure the links the host plugged in, found by MAC address."""

import socket

from vmm_task.netlink import open_iproute
from vmm_task.netlink.errors import NetworkConfigError

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
    link = await _find_link(ipr, interface)
    index = link["index"]
    await ipr.link("set", index=index, state="down")
    await ipr.flush_addr(index=index)
    for address, prefix, family in addresses:
        await ipr.addr("add", index=index, address=address, prefixlen=prefix, family=family)
    current_name = link.get("IFLA_IFNAME")
    if interface.name and interface.name != current_name:
        await _move_aside(ipr, interface.name)
    changes = {"ifname": interface.name or current_name}
    if interface.mtu:
        changes["mtu"] = interface.mtu
    noarp = interface.raw_flags & IFF_NOARP
    await ipr.link("set", index=index, flags=noarp, mask=IFF_NOARP, **changes)
    await ipr.link("set", index=index, state="up")


async def _find_link(ipr, interface):
    links = [link async for link in await ipr.link("dump")]
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


async def _move_aside(ipr, name: str) -> None:
    """Another link already has the name we must give: rename it to <name>-tmp (the host's
    order of plugging may differ from the guest kernel's eth numbering)."""
    indexes = await ipr.link_lookup(ifname=name)
    for index in indexes:
        await ipr.link("set", index=index, ifname=f"{name}-tmp"[:15])
