"""Kernel vsock: QEMU's `vhost-vsock-pci` on /dev/vhost-vsock, dialled with AF_VSOCK.

Used when the host has a usable /dev/vhost-vsock (not nested/containerised hosts like this
project's CI: there the hybrid backend serves instead). Guest CIDs are host-global, so each VM
gets one that no other VM on the host holds, checked with the same ioctl QEMU will issue.
"""

import asyncio
import errno
import fcntl
import os
import socket
import struct

VHOST_VSOCK_DEVICE = "/dev/vhost-vsock"
VHOST_VSOCK_SET_GUEST_CID = 0x4008AF60   # _IOW(VHOST_VIRTIO=0xAF, 0x60, __u64)
FIRST_GUEST_CID = 3                      # 0-2 are reserved (hypervisor, local, host)
MAX_GUEST_CID = 0xFFFFFFFE               # U32_MAX is VMADDR_CID_ANY


def usable(device: str = VHOST_VSOCK_DEVICE) -> bool:
    """True when this host can run vhost-vsock guests and dial them."""
    if not hasattr(socket, "AF_VSOCK"):
        return False
    try:
        os.close(os.open(device, os.O_RDWR))
    except OSError:
        return False
    return True


def cid_is_free(cid: int, device: str = VHOST_VSOCK_DEVICE) -> bool:
    """Asks the kernel whether `cid` is unclaimed (another process's VM may hold it)."""
    fd = os.open(device, os.O_RDWR)
    try:
        fcntl.ioctl(fd, VHOST_VSOCK_SET_GUEST_CID, struct.pack("<Q", cid))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return False
        raise
    finally:
        os.close(fd)
    return True


class CidAllocator:
    """Hands out guest CIDs unique among our VMs and free in the kernel."""

    def __init__(self, is_free=cid_is_free, first: int = FIRST_GUEST_CID):
        self._is_free = is_free
        self._first = first
        self._used = set()

    def allocate(self) -> int:
        for cid in range(self._first, MAX_GUEST_CID + 1):
            if cid not in self._used and self._is_free(cid):
                self._used.add(cid)
                return cid
        raise RuntimeError("no free vsock guest CID")

    def release(self, cid: int) -> None:
        self._used.discard(cid)


class KernelVsock:
    kind = "kernel"
    needs_shared_memory = False

    def __init__(self, guest_cid: int, release=None):
        """`release(cid)` runs at close(): hands the CID back to its allocator."""
        if not FIRST_GUEST_CID <= guest_cid <= MAX_GUEST_CID:
            raise ValueError(f"guest CID {guest_cid} is reserved or out of range")
        self.guest_cid = guest_cid
        self._release = release
        self.dead = None   # never resolves on its own: the kernel link lives as long as QEMU

    async def start(self) -> None:
        self.dead = asyncio.get_running_loop().create_future()

    def qemu_args(self, device_id: str = "vsock0", vhostfd: int | None = None) -> list:
        """`vhostfd`: /dev/vhost-vsock opened for QEMU (else QEMU opens it)."""
        device = f"vhost-vsock-pci,id={device_id},guest-cid={self.guest_cid}"
        return ["-device", device + (f",vhostfd={vhostfd}" if vhostfd is not None else "")]

    async def open_socket(self, port: int) -> socket.socket:
        """An AF_VSOCK socket connected to guest `port`."""
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (self.guest_cid, port))
        except BaseException:
            sock.close()
            raise
        return sock

    async def open_connection(self, port: int):
        """(reader, writer) of a stream to guest `port` over AF_VSOCK."""
        return await asyncio.open_connection(sock=await self.open_socket(port))

    async def close(self) -> None:
        if self._release is not None:
            self._release(self.guest_cid)
            self._release = None
        if self.dead is not None and not self.dead.done():
            self.dead.set_result("transport closed")
