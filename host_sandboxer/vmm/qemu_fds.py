"""The sockets and devices QEMU would open by path, opened by the daemon and inherited by QEMU.

So QEMU needs no access to the pod's directory (root's, 0700) and runs as a user of its own
with no rights there (containment/uids.py). QMP and the console: listening sockets bound at
their usual paths (the daemon, and a restarted one, connects there as before; QEMU accepts on
the fd it inherited: `-chardev socket,fd=N,server=on`). vhost-user (virtiofsd, the hybrid vsock
backend): a connection made for QEMU; each serves the first connection it accepts, whoever
made it. Kernel vsock: /dev/vhost-vsock opened for it (`vhostfd=`). What QEMU still opens by
path: the kernel and initrd, /dev/urandom, and /dev/kvm (GuestVm checks it may).
"""
from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

CONNECT_TIMEOUT_S = 5.0


class QemuFds:
    def __init__(self):
        self.fds: list[int] = []

    def listen(self, path: Path) -> int:
        """A socket listening at `path` (replacing what is there)."""
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            sock.listen(1)
        except BaseException:
            sock.close()
            raise
        self.fds.append(sock.detach())
        return self.fds[-1]

    async def connect(self, path: Path) -> int:
        """A connection to the server listening (or about to) at `path`, blocking again: QEMU
        sets its own mode. OSError if none listens within CONNECT_TIMEOUT_S."""
        try:
            sock = await asyncio.wait_for(connected_unix_socket(path), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ConnectionRefusedError(f"nothing listens at {path} after {CONNECT_TIMEOUT_S:g} s") from None
        sock.setblocking(True)
        self.fds.append(sock.detach())
        return self.fds[-1]

    def open(self, path: str) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        """QEMU has its copies (or failed): ours go."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []


async def connected_unix_socket(path: Path) -> socket.socket:
    """A socket connected to the server listening at `path`, tried until it does: a server
    (QEMU's QMP, virtiofsd) binds its socket, and until it listens a connect is refused. These
    tries are ours, not qemu.qmp's, which logs each failed connect as an ERROR. The caller
    bounds the wait."""
    loop = asyncio.get_running_loop()
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, os.fspath(path))
            return sock
        except BaseException as e:
            sock.close()
            if not isinstance(e, (FileNotFoundError, ConnectionRefusedError)):
                raise
        await asyncio.sleep(0.005)
