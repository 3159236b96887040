"""One VM's hybrid vsock on event-loop callbacks: QEMU's vhost-user socket, the host's
`CONNECT <port>` socket, and the device behind them.

host -> guest: connect to `uds_path`, write `CONNECT <port>\\n`, read `OK <host port>\\n`, then
bytes; the socket just closes if the guest refuses or its driver is not up yet.
guest -> host: a guest connect to host port P is bridged to the unix socket `<uds_path>_<P>`
when something listens there, else the guest gets RST.

`loop` is asyncio's (hybrid.py's HybridVsock, in-process) or reactor.Reactor (the backend
process, serve.py): only the callback methods both have are used, and nothing here imports
asyncio. `on_dead(reason)` runs once when the link is gone (QEMU disconnected, a malformed ring
reset the device, or close()).
"""
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


class HybridSockets:
    def __init__(self, loop, vhost_socket: str, uds_path: str, guest_cid: int = DEFAULT_GUEST_CID,
                 on_dead=None):
        self.loop = loop
        self.vhost_socket = str(vhost_socket)
        self.uds_path = str(uds_path)
        self.guest_cid = guest_cid
        self.on_dead = on_dead
        self.device = None
        self.backend = None
        self._listeners = []
        self._handshakes = {}        # socket -> (bytes of its CONNECT line so far, timeout handle)
        self._dead = False
        self._own_paths = False      # whether the socket files are ours to remove

    def start(self, frontend: socket.socket | None = None, clients: socket.socket | None = None) -> None:
        """Listens on both sockets, or serves the two listening at them already (`frontend`,
        `clients`: made by whoever removes them); must run before QEMU starts (QEMU connects
        at startup)."""
        self.device = VsockDevice(self.guest_cid, self._dial, self.loop,
                                  on_fail=lambda reason: self._died(f"device reset by a malformed ring: {reason}"))
        if frontend is None:
            self._own_paths = True
            frontend, clients = _listen(self.vhost_socket, backlog=1), _listen(self.uds_path, backlog=128)
        self._listeners = [frontend, clients]
        for listener in self._listeners:
            listener.setblocking(False)
        self.loop.add_reader(frontend.fileno(), self._accept_frontend, frontend)
        self.loop.add_reader(clients.fileno(), self._accept_client, clients)

    def close(self) -> None:
        for sock in list(self._handshakes):
            self._end_handshake(sock)
            sock.close()
        for listener in self._listeners:
            self.loop.remove_reader(listener.fileno())
            listener.close()
        self._listeners = []
        if self.backend is not None:
            self.backend.close("backend closed")
        elif self.device is not None:
            self.device.stop("backend closed")
        self._died("backend closed")
        if self._own_paths:
            for path in (self.vhost_socket, self.uds_path):
                _unlink(path)

    # -- internals --------------------------------------------------------------------

    def _died(self, reason: str) -> None:
        if not self._dead:
            self._dead = True
            if self.on_dead is not None:
                self.on_dead(reason)

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
        self.loop.remove_reader(listener.fileno())
        self._listeners.remove(listener)
        listener.close()
        if self._own_paths:
            _unlink(self.vhost_socket)
        self.backend = VhostUserBackend(sock, self.device, on_close=self._died)

    def _accept_client(self, listener: socket.socket) -> None:
        sock = self._accept(listener)
        if sock is None:
            return
        sock.setblocking(False)
        timeout = self.loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_failed, sock, "timed out")
        self._handshakes[sock] = (b"", timeout)
        self.loop.add_reader(sock.fileno(), self._on_handshake_readable, sock)

    def _on_handshake_readable(self, sock: socket.socket) -> None:
        line, timeout = self._handshakes[sock]
        try:
            line, port = read_connect(sock, line)
        except BlockingIOError:
            return
        except (OSError, ValueError) as e:
            self._handshake_failed(sock, str(e) or type(e).__name__)
            return
        if port is None:
            self._handshakes[sock] = (line, timeout)
            return
        self._end_handshake(sock)
        self.device.connect_from_host(sock, port, lambda host_port: sock.sendall(b"OK %d\n" % host_port))

    def _handshake_failed(self, sock: socket.socket, why: str) -> None:
        log.info("vsock socket %s: handshake failed: %s", self.uds_path, why)
        self._end_handshake(sock)
        sock.close()

    def _end_handshake(self, sock: socket.socket) -> None:
        _, timeout = self._handshakes.pop(sock)
        timeout.cancel()
        self.loop.remove_reader(sock.fileno())

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


def read_connect(sock: socket.socket, line: bytes) -> tuple[bytes, int | None]:
    """Reads on from `line` (what came so far) towards exactly the `CONNECT <port>\\n` line:
    bytes after it stay in the socket for the guest. (line, port) once whole, (line, None)
    while incomplete; BlockingIOError when nothing is there, ValueError for a bad line or EOF."""
    peek = sock.recv(MAX_LINE - len(line), socket.MSG_PEEK)
    if not peek:
        raise ValueError("closed before CONNECT")
    end = peek.find(b"\n")
    line += sock.recv(end + 1 if end >= 0 else len(peek))   # all of it belongs to the line
    if end < 0:
        if len(line) >= MAX_LINE:
            raise ValueError(f"no CONNECT line in {line!r}")
        return line, None
    match = CONNECT_LINE.fullmatch(line)
    if not match or int(match.group(1)) > 0xFFFFFFFF:
        raise ValueError(f"bad request line {line!r}")
    return line, int(match.group(1))


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
