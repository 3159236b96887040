"""Where a process's stdio goes, as named in the Task API's stdin/stdout/stderr strings.

- `vsock://PORT` or `vsock://CID:PORT` (Kuasar's form, in the VM): the agent listens on PORT
  (any CID) from Create/Exec on, and the host connects once per stream (only the host:
  vmm_task.peers; a refused peer does not use the stream up).
- `vsock://PORT?ack`: the same listener, kept for the life of the process; the stream speaks the
  acknowledged protocol (vmm_common.stdio_ack) so a restarted host resumes it (resumable.py).
- `unix://PATH` (`?ack` too): a unix socket listener in its place, for dev mode (no vsock there).
- `ttrpc+unix://...?streaming_id=ID` (also `ttrpc+vsock`, `ttrpc+hvsock`): containerd's
  Streaming service (`io_type = "streaming"`), the stream containerd opens with that ID on the
  task address (streams.py).
- anything else is a path (dev mode, as containerd gives a shim): a FIFO, a regular file
  (appended to) or a character device. `fifo://PATH` and `file://PATH` are accepted too.
See docs/stdio.md.
"""

import asyncio
import contextlib
import errno
import os
import socket
import stat

from vmm_common.stdio_ack import ACK_SUFFIX
from vmm_task import peers

from .errors import TaskError, invalid_argument

_LISTENER_SCHEMES = ("vsock", "hvsock", "unix")
_FIFO_RETRY_SECONDS = 0.02


class Endpoint:
    """One side of one stream, outside the container. `open_*` may wait (for a FIFO reader, or
    for the host to connect) and returns a non-blocking fd owned by the caller."""

    uri: str
    acked = False  # speaks the acknowledged protocol (vmm_common.stdio_ack)
    reader_waits = True  # False: open_reader returns at once (opened during Create/Start)

    async def open_writer(self) -> int:
        raise NotImplementedError

    async def open_reader(self) -> int:
        raise NotImplementedError

    async def delivered(self) -> None:
        """After the writer's fd was closed: until what was written reached the far end (a relay
        behind the fd has sent it on)."""

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


class ListenerEndpoint(Endpoint):
    """A listening socket from construction on, so the host may connect as soon as the RPC
    returned. Plain: one connection, then the listener closes. `acked`: the listener stays until
    `close()`, each `accept()` taking the host's next connection (after a host restart)."""

    def __init__(self, uri: str, family: int, address, acked: bool):
        self.uri = uri
        self.acked = acked
        self._path = address if family == socket.AF_UNIX else None
        self._listener = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._listener.bind(address)
            self._listener.listen(1)
            self._listener.setblocking(False)
        except OSError:
            self._listener.close()
            raise

    async def accept(self) -> socket.socket:
        """The next connection from the host (others are refused and closed)."""
        while True:
            conn, _ = await asyncio.get_running_loop().sock_accept(self._listener)
            if peers.admitted(conn, self.uri):
                conn.setblocking(False)
                return conn

    async def _accept_once(self) -> int:
        try:
            conn = await self.accept()
        finally:
            self.close()
        return conn.detach()

    open_writer = _accept_once
    open_reader = _accept_once

    def close(self) -> None:
        if self._listener.fileno() >= 0 and self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
        self._listener.close()


def parse_endpoint(stream: str, uri: str) -> Endpoint:
    """INVALID_ARGUMENT for a malformed vsock/unix address or a relative path; UNKNOWN when a
    port cannot be listened on (in use, or no vsock in this kernel)."""
    from .streams import StreamEndpoint, stream_id_of  # streams.py builds on Endpoint
    stream_id = stream_id_of(stream, uri)
    if stream_id is not None:
        return StreamEndpoint(uri, stream_id)
    listener = _parse_listener(stream, uri)
    if listener is not None:
        family, address, acked = listener
        try:
            return ListenerEndpoint(uri, family, address, acked)
        except OSError as e:
            raise TaskError("UNKNOWN", f"{stream} {uri!r}: cannot listen: {e.strerror or e}") from None
    path = uri
    for scheme in ("fifo://", "file://"):
        if uri.startswith(scheme):
            path = uri[len(scheme):]
    if not os.path.isabs(path) or "\0" in path:
        raise invalid_argument(f"{stream} {uri!r}: expected an absolute path or vsock://PORT")
    return PathEndpoint(uri, path)


def _parse_listener(stream: str, uri: str):
    """(family, address, acked) for a vsock:// or unix:// string, None for anything else."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in _LISTENER_SCHEMES:
        return None
    address, query_sep, query = rest.partition("?")
    if query_sep and "?" + query != ACK_SUFFIX:
        raise invalid_argument(f"{stream} {uri!r}: the only option is {ACK_SUFFIX!r}")
    acked = bool(query_sep)
    if scheme == "unix":
        if not os.path.isabs(address) or "\0" in address:
            raise invalid_argument(f"{stream} {uri!r}: expected unix:///ABSOLUTE/PATH")
        return socket.AF_UNIX, address, acked
    port = address.rsplit(":", 1)[-1]
    if not port.isdigit() or not 0 < int(port) < 2**32:
        raise invalid_argument(f"{stream} {uri!r}: expected vsock://PORT or vsock://CID:PORT"
                               f" (optionally {ACK_SUFFIX})")
    return socket.AF_VSOCK, (socket.VMADDR_CID_ANY, int(port)), acked


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except FileNotFoundError:
        return False
