"""Hybrid vsock for one VM on the caller's asyncio loop: our vhost-user-vsock backend behind
Firecracker-style unix sockets (hybrid_sockets.py), with the transport face of __init__.py.

Used in-process by throwaway VMs (`vmm-sandboxer check`, tests); the daemon's pods use the
backend process instead (serve.py, which runs HybridSockets on its own loop) so that VMs keep
their vsock across daemon restarts.
"""

import asyncio
import socket

from . import qemu_args
from .hybrid_client import take_answer
from .hybrid_sockets import DEFAULT_GUEST_CID, HybridSockets


class HybridVsock:
    kind = "hybrid"
    needs_shared_memory = True   # QEMU must back guest RAM with memory-backend-memfd,share=on

    def __init__(self, vhost_socket: str, uds_path: str, guest_cid: int = DEFAULT_GUEST_CID):
        self.vhost_socket = str(vhost_socket)
        self.uds_path = str(uds_path)
        self.guest_cid = guest_cid
        self.sockets: HybridSockets | None = None
        self.dead = None            # Future[str]: resolves with the reason when the link is gone

    @property
    def device(self):
        return self.sockets.device if self.sockets else None

    @property
    def backend(self):
        return self.sockets.backend if self.sockets else None

    async def start(self) -> None:
        """Listens on both sockets; must run before QEMU starts (QEMU connects at startup)."""
        loop = asyncio.get_running_loop()
        self.dead = loop.create_future()
        self.sockets = HybridSockets(loop, self.vhost_socket, self.uds_path, self.guest_cid, on_dead=self._died)
        self.sockets.start()

    def qemu_args(self, chardev_id: str = "vsock0", fd: int | None = None) -> list:
        return qemu_args(self.vhost_socket, chardev_id, fd)

    async def open_socket(self, port: int) -> socket.socket:
        """A socket streaming to guest `port`, the handshake done; ConnectionRefusedError if
        nobody answers.

        In-process callers skip the unix listener: one end of a socketpair goes straight to the
        device, which answers `OK <n>` on it exactly as it does for outside clients.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.setblocking(False)
        ours.setblocking(False)
        self.device.connect_from_host(theirs, port, lambda host_port: theirs.sendall(b"OK %d\n" % host_port))
        return await take_answer(ours, port)

    async def open_connection(self, port: int):
        """(reader, writer) of a stream to guest `port`; ConnectionRefusedError if nobody answers."""
        return await asyncio.open_connection(sock=await self.open_socket(port))

    async def close(self) -> None:
        if self.sockets is not None:
            self.sockets.close()
        self._died("backend closed")

    def _died(self, reason: str) -> None:
        if self.dead is not None and not self.dead.done():
            self.dead.set_result(reason)
