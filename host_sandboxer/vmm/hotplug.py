"""A running guest's per-pod devices added over QMP: what a template's clone gets after the
restore, since QEMU 7.2 cannot migrate vhost-user devices and a template has no pod (docs/templates.md).

Every socket and tap is opened by the daemon and handed to QEMU (`getfd`), as at boot
(qemu_fds.py): QEMU runs as a user with no right on the pod's directory. Each device goes into
its spare PCIe root port (cmdline.py `clonable`); the guest sets it up through ACPI PCI hot-plug.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

from host_sandboxer.vmm.cmdline import TapNic, nic_properties
from host_sandboxer.vmm.qemu import Qemu
from host_sandboxer.vmm.qemu_fds import CONNECT_TIMEOUT_S, connected_unix_socket


async def add_vhost_user(qemu: Qemu, chardev: str, socket_path: Path, device: dict) -> None:
    """`device` (its driver, id and bus), on a chardev connected to the vhost-user backend
    listening at `socket_path` (virtiofsd, the vsock backend), which serves the first
    connection it accepts: the one made here for QEMU."""
    try:
        sock = await asyncio.wait_for(connected_unix_socket(socket_path), CONNECT_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise ConnectionRefusedError(f"nothing listens at {socket_path} after {CONNECT_TIMEOUT_S:g} s") from None
    try:
        sock.setblocking(True)  # QEMU sets its own mode
        await qemu.pass_fd(chardev, sock.fileno())
    finally:
        sock.close()
    await qemu.qmp.execute("chardev-add", {"id": chardev, "backend": {"type": "socket", "data": {
        "addr": {"type": "fd", "data": {"str": chardev}}, "server": False}}})
    await qemu.qmp.execute("device_add", {**device, "chardev": chardev})


async def add_tap_nic(qemu: Qemu, nic: TapNic, bus: str, machine: str) -> None:
    """virtio-net with `nic`'s MAC on its tap (one fd per queue)."""
    names = [f"{nic.id}-q{queue}" for queue in range(len(nic.fds))]
    for name, fd in zip(names, nic.fds):
        await qemu.pass_fd(name, fd)
    await qemu.qmp.execute("netdev_add", {"type": "tap", "id": nic.id,
                                          **({"fds": ":".join(names)} if len(names) > 1 else {"fd": names[0]})})
    await qemu.qmp.execute("device_add", {"driver": "virtio-net-pci", "id": f"{nic.id}-dev", "bus": bus,
                                          **nic_properties(nic, machine)})
