"""Tap devices for QEMU, created by opening /dev/net/tun in the calling thread's namespace.

The tap is not persistent: it lives while a queue fd is open, so once QEMU holds the fds and we
close ours, QEMU's exit (or a crash of everyone) removes it and the tc filters on it.
"""
from __future__ import annotations

import fcntl
import os
import struct

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16


def open_tap(name: str, queues: int) -> list[int]:
    """Create tap `name` with `queues` queues (multi-queue when > 1); one fd per queue."""
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
    request = struct.pack(f"{IFNAMSIZ}sH", name.encode(), flags)
    fds: list[int] = []
    try:
        for _ in range(queues):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            fds.append(fd)
            fcntl.ioctl(fd, TUNSETIFF, request)
    except OSError:
        close_fds(fds)
        raise
    return fds


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
