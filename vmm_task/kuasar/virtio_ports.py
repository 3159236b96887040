"""Stdio over virtio-serial ports, as Kuasar's QEMU host carries a container's FIFOs: it hot-plugs
one `virtserialport` per FIFO (a chardev `pipe` on the FIFO, port name `chardev<N>`:
vmm/sandbox/src/io.rs, qemu/devices/char.rs) and writes the port's name in the io file; the
guest opens the port's device, found by name under /sys/class/virtio-ports (vmm/task/src/io.rs,
find_serial_dev).

A stdio string that is a bare name (no "/", so neither a path nor a `scheme://` address) is such
a port, whoever sent it. The port can appear a moment after the host's QMP call returned (the
guest learns its name from the device's control queue): it is waited for up to PORT_WAIT_S.
"""

import os
from typing import Optional

from vmm_task.container.errors import invalid_argument
from vmm_task.container.stdio import Stdio

from .polling import poll

SYSFS_PORTS = "/sys/class/virtio-ports"
PORT_WAIT_S = 5.0
_POLL_S = 0.02


def is_port_name(value: str) -> bool:
    return bool(value) and "/" not in value


async def resolve_ports(stdio: Stdio, sysfs: str = SYSFS_PORTS, dev: str = "/dev",
                        timeout: float = PORT_WAIT_S) -> Stdio:
    """`stdio` with each port name replaced by the port's device path."""
    resolved = list(stdio[:3])
    for index, (stream, value) in enumerate(zip(("stdin", "stdout", "stderr"), stdio[:3])):
        if is_port_name(value):
            resolved[index] = await port_device(stream, value, sysfs, dev, timeout)
    return Stdio(*resolved, stdio.terminal)


async def port_device(stream: str, name: str, sysfs: str = SYSFS_PORTS, dev: str = "/dev",
                      timeout: float = PORT_WAIT_S) -> str:
    """The device path of the virtio-serial port named `name`; INVALID_ARGUMENT if none."""
    if "\0" in name or name in (".", ".."):
        raise invalid_argument(f"{stream} {name!r}: not a virtio-serial port name")
    if not os.path.isdir(sysfs):
        raise invalid_argument(f"{stream} {name!r}: names a virtio-serial port, but this system "
                               f"has none ({sysfs} is missing)")
    entry = await poll(lambda: _port_named(sysfs, name), timeout, _POLL_S)
    if entry is None:
        raise invalid_argument(f"{stream} {name!r}: no virtio-serial port of that name "
                               f"appeared within {timeout:.0f}s (ports: {_names(sysfs)})")
    return os.path.join(dev, entry)


def _port_named(sysfs: str, name: str) -> Optional[str]:
    for entry, port_name in _ports(sysfs):
        if port_name == name:
            return entry
    return None


def _names(sysfs: str) -> str:
    return ", ".join(f"{entry}={name or '(unnamed)'}" for entry, name in _ports(sysfs)) or "none"


def _ports(sysfs: str) -> list[tuple[str, str]]:
    """(device name, port name) of every port; a port going away meanwhile is skipped."""
    found = []
    for entry in sorted(os.listdir(sysfs)):
        try:
            with open(os.path.join(sysfs, entry, "name"), encoding="utf-8",
                      errors="replace") as f:
                found.append((entry, f.read().strip()))
        except OSError:
            continue
    return found
