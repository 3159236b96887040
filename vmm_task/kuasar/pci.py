"""The block device behind the PCI address of a `blk` storage (storages.py).

Kuasar's QEMU host hot-plugs the disk (virtio-blk-pci) into a slot of its pci-bridge and names
it `0000:<bridge slot>:<device slot>.0` (vmm/sandbox/src/qemu/mod.rs hot_attach, bridges from
qemu/devices/mod.rs create_bridges): the middle number is the slot of the bridge on the root
bus, not a bus number. An address that is a real PCI address in the guest is taken as it is;
otherwise it is read that way: the device at `<device slot>` behind the bridge at
`0000:00:<bridge slot>.0`. As the guest there does (vmm/task/src/device.rs), the PCI bus is
rescanned first, in case the kernel missed the hot-plug, and the disk is waited for.
"""

import glob
import os
import re
from typing import Optional

from vmm_task.container.errors import TaskError, invalid_argument

from .polling import poll

DEVICE_WAIT_S = 10.0
_POLL_S = 0.05
_ADDRESS = re.compile(r"([0-9a-f]{4}):([0-9a-f]{2}):([0-1][0-9a-f])\.([0-7])")


async def block_device(address: str, what: str, sysfs: str = "/sys", dev: str = "/dev",
                       timeout: float = DEVICE_WAIT_S) -> str:
    """/dev/<disk> of the virtio-blk device at `address` (see above)."""
    match = _ADDRESS.fullmatch(address.lower())
    if match is None:
        raise invalid_argument(f"{what}: source {address!r} is not a PCI address "
                               "(DDDD:BB:SS.F)")
    _rescan(sysfs)
    disk = await poll(lambda: _disk_at(sysfs, match), timeout, _POLL_S)
    if disk is None:
        raise TaskError("UNKNOWN", f"{what}: no virtio-blk disk appeared at PCI address "
                                   f"{address} within {timeout:.0f}s")
    return os.path.join(dev, disk)


def _rescan(sysfs: str) -> None:
    try:
        with open(os.path.join(sysfs, "bus/pci/rescan"), "w") as f:
            f.write("1")
    except OSError:
        pass  # no PCI bus to rescan: the wait reports the missing disk


def _disk_at(sysfs: str, match: re.Match) -> Optional[str]:
    devices = os.path.join(sysfs, "bus/pci/devices")
    domain, bus, slot, function = match.groups()
    for device in (f"{domain}:{bus}:{slot}.{function}", _behind_bridge(devices, match)):
        if device is None:
            continue
        disks = glob.glob(os.path.join(devices, device, "virtio*", "block", "*"))
        if disks:
            return os.path.basename(sorted(disks)[0])
    return None


def _behind_bridge(devices: str, match: re.Match) -> Optional[str]:
    """The address of the device at slot.function behind the bridge at root-bus slot `bus`."""
    domain, bridge_slot, slot, function = match.groups()
    bridge = os.path.join(devices, f"{domain}:00:{bridge_slot}.0")
    try:
        children = os.listdir(os.path.realpath(bridge))
    except OSError:
        return None
    wanted = re.compile(rf"{domain}:[0-9a-f]{{2}}:{slot}\.{function}")
    return next((child for child in sorted(children) if wanted.fullmatch(child)), None)
