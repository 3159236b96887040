"""Hybrid vsock for one VM: our vhost-user-vsock backend behind Firecracker-style unix sockets.

host -> guest: connect to `uds_path`, write `CONNECT <port>\\n`, read `OK <host port>\\n`, then
bytes; the socket just closes if the guest refuses or its driver is not up yet.
guest -> host: a guest connect to host port P is bridged to the unix socket `<uds_path>_<P>`
when something listens there, else the guest gets RST.

The backend runs on the caller's event loop (one loop serves every VM; see docs/vsock.md); the
daemon runs it in a process of its own per VM (`serve.py`) so VMs keep vsock across its restarts.
"""

import asyncio
import logging
import os
import re
import socket

from .backend import VhostUserBackend
from .device import VsockDevice

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 5.0
MAX_LINE = 64
CONNECT_LINE = re.compile(rb"CONNECT (\d{1,10})\r?\n")
DEFAULT_GUEST_CID = 3


class HybridVsock:
    kind = "hybrid"
    needs_shared_memory = True   # QEMU must back guest RAM with memory-backend-memfd,share=on

    def __init__(self, vhost_socket: str, uds_path: str, guest_cid: int = DEFAULT_GUEST_CID):
        self.vhost_socket = str(vhost_socket)
        self.uds_path = str(uds_path)
        self.guest_cid = guest_cid
        self.device = None
        self.backend = None
        self.dead = None            # Future[str]: resolves with the reason when the link is gone
        self._listeners = []
        self._handshakes = set()

    # -- the launcher's face ----------------------------------------------------------

    async def start(self) -> None:
        """Listens on both sockets; must run before QEMU starts (QEMU connects at startup)."""
        loop = asyncio.get_running_loop()
        self.dead = loop.create_future()
        self.device = VsockDevice(self.guest_cid, self._dial, loop,
                                  on_fail=lambda reason: self._died(f"device reset by a malformed ring: {reason}"))
        frontend = _listen(self.vhost_socket, backlog=1)
        clients = _listen(self.uds_path, backlog=128)
        self._listeners = [frontend, clients]
        loop.add_reader(frontend.fileno(), self._accept_frontend, frontend)
        loop.add_reader(clients.fileno(), self._accept_client, clients)

    def qemu_args(self, chardev_id: str = "vsock0") -> list:
        return qemu_args(self.vhost_socket, chardev_id)

    async def open_connection(self, port: int):
        """(reader, writer) of a stream to guest `port`; ConnectionRefusedError if nobody answers.

        In-process callers skip the unix listener: one end of a socketpair goes straight to the
        device, which answers `OK <n>` on it exactly as it does for outside clients.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.setblocking(False)
        self.device.connect_from_host(theirs, port, lambda host_port: theirs.sendall(b"OK %d\n" % host_port))
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        try:
            line = await reader.readline()
        except BaseException:          # cancelled (a caller's timeout) or reset
            writer.close()
            raise
        if not line.startswith(b"OK "):
            writer.close()
            raise ConnectionRefusedError(f"vsock port {port} of guest cid {self.guest_cid}: "
                                         f"refused (nothing listening, or the guest is not up)")
        return reader, writer

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for task in list(self._handshakes):
            task.cancel()
        self._close_listeners(loop)
        if self.backend is not None:
            self.backend.close("backend closed")
        elif self.device is not None:
            self.device.stop("backend closed")
        self._died("backend closed")
        for path in (self.vhost_socket, self.uds_path):
            _unlink(path)

    # -- internals --------------------------------------------------------------------

    def _close_listeners(self, loop) -> None:
        for listener in self._listeners:
            loop.remove_reader(listener.fileno())
            listener.close()
        self._listeners = []

    def _died(self, reason: str) -> None:
        if self.dead is not None and not self.dead.done():
            self.dead.set_result(reason)

    def _accept(self, listener: socket.socket):
        try:
            return listener.accept()[0]
        except BlockingIOError:
            return None
        except OSError as e:
            log.error("vsock cid %d: accept on %s failed: %s", self.guest_cid, listener.getsockname(), e)
            return None

    def _accept_frontend(self, listener: socket.socket) -> None:
        sock = self._accept(listener)
        if sock is None:
            return
        # One front-end per VM, ever: QEMU 7.2 cannot reconnect a vhost-user-vsock device.
        self.device.loop.remove_reader(listener.fileno())
        self._listeners.remove(listener)
        listener.close()
        _unlink(self.vhost_socket)
        self.backend = VhostUserBackend(sock, self.device, on_close=self._died)

    def _accept_client(self, listener: socket.socket) -> None:
        sock = self._accept(listener)
        if sock is None:
            return
        sock.setblocking(False)
        task = asyncio.ensure_future(self._handshake(sock))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, sock: socket.socket) -> None:
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                port = await _read_connect(sock)
        except (TimeoutError, OSError, ValueError, asyncio.CancelledError) as e:
            log.info("vsock socket %s: handshake failed: %s", self.uds_path, e or type(e).__name__)
            sock.close()
            return
        self.device.connect_from_host(sock, port, lambda host_port: sock.sendall(b"OK %d\n" % host_port))

    def _dial(self, port: int):
        """Host end of a guest-initiated stream: `<uds_path>_<port>`, or None (the guest gets RST)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(f"{self.uds_path}_{port}")
        except OSError:
            sock.close()
            return None
        return sock


def qemu_args(vhost_socket: str, chardev_id: str = "vsock0") -> list:
    """QEMU's arguments for a vhost-user-vsock device served on `vhost_socket`."""
    return ["-chardev", f"socket,id={chardev_id},path={vhost_socket}",
            "-device", f"vhost-user-vsock-pci,chardev={chardev_id}"]


async def _read_connect(sock: socket.socket) -> int:
    """Reads exactly the `CONNECT <port>\\n` line; bytes after it stay in the socket for the guest."""
    loop = asyncio.get_running_loop()
    line = b""
    while True:
        try:
            peek = sock.recv(MAX_LINE - len(line), socket.MSG_PEEK)
        except BlockingIOError:
            ready = loop.create_future()
            loop.add_reader(sock.fileno(), lambda: ready.done() or ready.set_result(None))
            try:
                await ready
            finally:
                loop.remove_reader(sock.fileno())
            continue
        if not peek:
            raise ValueError("closed before CONNECT")
        end = peek.find(b"\n")
        line += sock.recv(end + 1 if end >= 0 else len(peek))   # all of it belongs to the line
        if end >= 0:
            break
        if len(line) >= MAX_LINE:
            raise ValueError(f"no CONNECT line in {line!r}")
    match = CONNECT_LINE.fullmatch(line)
    if not match or int(match.group(1)) > 0xFFFFFFFF:
        raise ValueError(f"bad request line {line!r}")
    return int(match.group(1))


def _listen(path: str, backlog: int) -> socket.socket:
    _unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
