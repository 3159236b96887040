"""The ttrpc server: a registry of services and an accept loop on a listening socket."""
import asyncio
import logging
import socket
from collections.abc import Callable

from .channel import Channel
from .connection import ServerConnection
from .errors import Code, RpcError
from .methods import Method

log = logging.getLogger("vmm_common.ttrpc")

ACCEPT_RETRY_S = 0.1  # after EMFILE and the like: back off, keep serving


class Server:
    def __init__(self):
        self._services: dict[str, dict[str, Method]] = {}
        self._lazy: dict[str, Callable[[], dict[str, Method]]] = {}

    def register(self, service: str, methods: dict[str, Method]) -> None:
        """Add `service` ("grpc.SandboxService") with its {"Method": unary(...), ...}."""
        self._check_new(service)
        self._services[service] = _checked(service, methods)

    def register_lazy(self, service: str, load: Callable[[], dict[str, Method]]) -> None:
        """Add `service` whose methods `load()` returns on its first request, so that what they
        import (protos, handlers) costs nothing until a client needs them. A `load` that fails
        answers that request INTERNAL, naming the service, and is tried again on the next."""
        self._check_new(service)
        self._lazy[service] = load

    def lookup(self, service: str, method: str) -> Method:
        """The handler of `service/method`, loading a lazy service; RpcError if there is none."""
        if service in self._lazy:
            self._load(service)
        methods = self._services.get(service)
        if methods is None:
            raise RpcError(Code.UNIMPLEMENTED, f"unknown service {service}")
        found = methods.get(method)
        if found is None:
            raise RpcError(Code.UNIMPLEMENTED, f"unknown method {service}/{method}")
        return found

    def _load(self, service: str) -> None:
        try:
            methods = _checked(service, self._lazy[service]())
        except Exception as e:  # a broken service must cost its calls, never the server
            log.exception("ttrpc: loading service %s failed", service)
            raise RpcError(Code.INTERNAL, f"service {service} failed to load: {e}") from None
        self._services[service] = methods
        del self._lazy[service]

    def _check_new(self, service: str) -> None:
        if service in self._services or service in self._lazy:
            raise ValueError(f"service {service} is already registered")

    async def serve(self, sock: socket.socket,
                    admit: Callable[[socket.socket], bool] | None = None) -> None:
        """Accept on `sock` (AF_UNIX or AF_VSOCK, listening) until cancelled. `admit(conn)`
        False: the connection is not served (`admit` closed it)."""
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        connections: set[asyncio.Task] = set()
        try:
            while True:
                try:
                    conn, _ = await loop.sock_accept(sock)
                except OSError as e:
                    log.warning("ttrpc: accept failed: %s", e)
                    await asyncio.sleep(ACCEPT_RETRY_S)
                    continue
                if admit is not None and not admit(conn):
                    continue
                task = asyncio.create_task(self._serve_socket(conn))
                connections.add(task)
                task.add_done_callback(connections.discard)
        finally:
            for task in connections:
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)

    async def _serve_socket(self, conn: socket.socket) -> None:
        peer = _peer_name(conn)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        protocol = _ReadToTheEnd(reader, conn)
        try:
            transport, _ = await loop.create_connection(lambda: protocol, sock=conn)
        except OSError as e:
            log.debug("ttrpc: dropping connection from %s: %s", peer, e)
            conn.close()
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        await self.serve_connection(reader, writer, peer)

    async def serve_connection(self, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter, peer: str = "peer") -> None:
        """Serve one already-open byte stream (e.g. a hybrid-vsock connection) until it ends."""
        await ServerConnection(self.lookup, Channel(reader, writer), peer).run()


class _ReadToTheEnd(asyncio.StreamReaderProtocol):
    """asyncio.open_connection's protocol, except that a failed write (EPIPE: the client closed
    while we answered) does not lose what the client sent before closing. asyncio stops reading
    on any write error and fails the reader; containerd closes a stream's connection right after
    its last message and CloseSend, while we may still be sending it a window update. What the
    socket holds is read into the reader, which then ends cleanly."""

    def __init__(self, reader: asyncio.StreamReader, sock: socket.socket):
        super().__init__(reader)
        self._reader = reader
        self._sock = sock

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            while True:
                try:
                    data = self._sock.recv(1 << 16)
                except OSError:  # BlockingIOError: all read; ECONNRESET and the like: gone
                    break
                if not data:
                    break
                self._reader.feed_data(data)
            exc = None
        super().connection_lost(exc)


def _checked(service: str, methods: dict[str, Method]) -> dict[str, Method]:
    for name, method in methods.items():
        if not isinstance(method, Method):
            raise TypeError(f"{service}/{name}: use ttrpc.unary() or a *_stream() helper")
    return dict(methods)


def _peer_name(conn: socket.socket) -> str:
    try:
        return str(conn.getpeername() or conn.family.name)
    except OSError:
        return conn.family.name
