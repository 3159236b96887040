"""Where a process's stdio goes, as named in the Task API's stdin/stdout/stderr strings.

- `vsock://PORT` or `vsock://CID:PORT` (Kuasar's form, in the VM): the agent listens on PORT
  (any CID) from Create/Exec on, and the host connects once per stream.
- anything else is a path (dev mode, as containerd gives a shim): a FIFO, a regular file
  (appended to) or a character device. `fifo://PATH` and `file://PATH` are accepted too.
See docs/stdio.md.
"""

import asyncio
import errno
import os
import socket
import stat

from .errors import TaskError, invalid_argument
from .fdcopy import set_nonblocking

_VSOCK_SCHEMES = ("vsock://", "hvsock://")
_FIFO_RETRY_SECONDS = 0.02


class Endpoint:
    """One side of one stream, outside the container. `open_*` may wait (for a FIFO reader, or
    for the host to connect) and returns a non-blocking fd owned by the caller."""

    uri: str
    reader_waits = True  # False: open_reader returns at once (opened during Create/Start)

    async def open_writer(self) -> int:
        raise NotImplementedError

    async def open_reader(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Release what was reserved at parse time (a listening socket)."""


class PathEndpoint(Endpoint):
    reader_waits = False

    def __init__(self, uri: str, path: str):
        self.uri = uri
        self.path = path

    async def open_writer(self) -> int:
        flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
        while True:
            try:
                if _is_fifo(self.path):
                    return os.open(self.path, flags)
                return os.open(self.path, flags | os.O_CREAT | os.O_APPEND, 0o600)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: a FIFO nobody reads yet
                    raise
            await asyncio.sleep(_FIFO_RETRY_SECONDS)

    async def open_reader(self) -> int:
        return os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)


class VsockEndpoint(Endpoint):
    """Listens from construction on, so the host may connect as soon as the RPC returned."""

    def __init__(self, uri: str, port: int):
        self.uri = uri
        self.port = port
        self._listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._listener.bind((socket.VMADDR_CID_ANY, port))
            self._listener.listen(1)
            self._listener.setblocking(False)
        except OSError:
            self._listener.close()
            raise

    async def _accept(self) -> int:
        loop = asyncio.get_running_loop()
        try:
            conn, _ = await loop.sock_accept(self._listener)
        finally:
            self.close()
        return set_nonblocking(conn.detach())

    open_writer = _accept
    open_reader = _accept

    def close(self) -> None:
        self._listener.close()


def parse_endpoint(stream: str, uri: str) -> Endpoint:
    """INVALID_ARGUMENT for a malformed vsock address or a relative path; UNKNOWN when a vsock
    port cannot be listened on (in use, or no vsock in this kernel)."""
    for scheme in _VSOCK_SCHEMES:
        if uri.startswith(scheme):
            port = uri[len(scheme):].rsplit(":", 1)[-1]
            if not port.isdigit() or not 0 < int(port) < 2**32:
                raise invalid_argument(f"{stream} {uri!r}: expected vsock://PORT or vsock://CID:PORT")
            try:
                return VsockEndpoint(uri, int(port))
            except OSError as e:
                raise TaskError("UNKNOWN", f"{stream} {uri!r}: cannot listen on vsock port "
                                           f"{port}: {e.strerror or e}") from None
    path = uri
    for scheme in ("fifo://", "file://"):
        if uri.startswith(scheme):
            path = uri[len(scheme):]
    if not os.path.isabs(path) or "\0" in path:
        raise invalid_argument(f"{stream} {uri!r}: expected an absolute path or vsock://PORT")
    return PathEndpoint(uri, path)


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except FileNotFoundError:
        return False
