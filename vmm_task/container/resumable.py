"""Streams in the acknowledged form (`vsock://PORT?ack`, vmm_common.stdio_ack): the host may go
away (a daemon killed and restarted) and come back without a byte of output lost and without
the process's stdin being closed.

Output: `ResumableOutput` reads the process's pipe into `Retained` (every byte not yet
acknowledged, at most WINDOW: when full it stops reading, so the process blocks instead of
losing output) and serves it to the host's connection from the offset the host says it has.
Stdin: `pump_stdin` writes each frame's bytes to the process; a frame of length 0 closes it.
Each endpoint serves one connection at a time, the newest: a host that connects again has given
up its previous connection, even if the guest has not seen that one end yet (stdin first lets the
previous one deliver what it still holds, for up to STDIN_GRACE_S).
"""

import asyncio
import collections
import logging
import os
import socket
import time

from vmm_common.fdio import read_chunk, wait_readable, write_all, write_some
from vmm_common.stdio_ack import FRAME, MAX_FRAME, OFFSET, WINDOW, ProtocolError


log = logging.getLogger(__name__)

_READ = 64 * 1024  # socket reads: acks and frame headers are small, frames at most MAX_FRAME
# Output is read from the process once a connected host has all but this much of it: a read per
# small write of the process (a wakeup and syscalls each, dear under TCG) would otherwise race
# the sending; the widened pipe (1 MiB) holds the process's output meanwhile.
READ_AHEAD = 256 * 1024
STDIN_GRACE_S = 2.0  # a new stdin connection waits this long for the previous one's last frames


class Retained:
    """Output read from the process and not yet acknowledged by the host, by stream offset:
    `acked` <= `sent` <= `end`."""

    def __init__(self, window: int = WINDOW):
        self.window = window
        self.acked = 0  # the host delivered everything before this offset
        self.sent = 0   # the furthest offset ever sent: a host cannot have more
        self.end = 0    # the offset of the next byte read from the process
        self._chunks: collections.deque[bytes] = collections.deque()
        self._skip = 0  # bytes at the head of _chunks[0] already acknowledged

    def room(self) -> int:
        return self.window - (self.end - self.acked)

    def append(self, data: bytes) -> None:
        self._chunks.append(data)
        self.end += len(data)

    def ack(self, offset: int, limit: int) -> None:
        """The host delivered everything before `offset`; it cannot have more than `limit`."""
        if not self.acked <= offset <= limit:
            raise ProtocolError(f"offset {offset} outside the retained bytes {self.acked}..{limit}")
        drop = offset - self.acked
        while drop:
            head = len(self._chunks[0]) - self._skip
            if drop < head:
                self._skip += drop
                break
            self._chunks.popleft()
            self._skip = 0
            drop -= head
        self.acked = offset

    def resume(self, offset: int) -> None:
        """A new connection starts at the host's `offset`: what it delivered, what is resent."""
        self.ack(offset, self.sent)

    def view_at(self, offset: int) -> memoryview:
        """Retained bytes from `offset` to the end of the chunk holding it (empty at `end`)."""
        position = self.acked - self._skip  # the offset of _chunks[0][0]
        for chunk in self._chunks:
            if offset < position + len(chunk):
                return memoryview(chunk)[offset - position:]
            position += len(chunk)
        return memoryview(b"")


class SocketReader:
    """Exact-size reads from a non-blocking socket; EOFError when the peer is gone."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buffer = bytearray()

    async def read_exact(self, size: int) -> bytes:
        while len(self._buffer) < size:
            await wait_readable(self.sock.fileno())
            try:
                data = self.sock.recv(max(_READ, size - len(self._buffer)))
            except BlockingIOError:
                continue
            if not data:
                raise EOFError("the host closed the connection")
            self._buffer += data
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def read_offset(self) -> int:
        return OFFSET.unpack(await self.read_exact(OFFSET.size))[0]


async def serve_newest(accept, session, grace: float = 0.0) -> None:
    """Run `session(sock)` on each connection `accept()` gives, one at a time, until a session
    returns True (the stream is complete). A newer connection replaces the current session after
    `grace` seconds (time to take in what the previous host sent before it went away)."""
    accepting = asyncio.ensure_future(accept())
    current = None
    try:
        while True:
            await asyncio.wait({accepting} | ({current} if current else set()),
                               return_when=asyncio.FIRST_COMPLETED)
            if accepting.done() and current is not None and not current.done():
                await asyncio.wait({current}, timeout=grace)
                current.cancel()
            if current is not None and current.done() and not current.cancelled() and current.result():
                if accepting.done():
                    accepting.result().close()
                return
            if accepting.done():
                current = asyncio.ensure_future(session(accepting.result()))
                accepting = asyncio.ensure_future(accept())
            elif current is not None and current.done():
                current = None  # that host went away: wait for the next
    finally:
        accepting.cancel()
        if current is not None:
            current.cancel()


class ResumableOutput:
    """One output stream (stdout/stderr) in the acknowledged form. `progress` is the monotonic
    time bytes last moved (read, sent or acknowledged), for the exit's idle rule (stdio.drain)."""

    def __init__(self, name: str, window: int = WINDOW):
        self.name = name
        self.retained = Retained(window)
        self.eof = False
        self.progress = time.monotonic()
        self._changed = asyncio.Event()
        self._sessions = 0  # host connections being served (a newer one may start before the old ends)

    def _moved(self) -> None:
        self.progress = time.monotonic()
        self._changed.set()

    async def _wait_change(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    async def run(self, src: int, accept) -> None:
        """Until the host acknowledged every byte up to EOF of `src`."""
        reading = asyncio.ensure_future(self._read(src))
        try:
            await serve_newest(accept, self._session)
        finally:
            reading.cancel()

    async def _read(self, src: int) -> None:
        while True:
            while self.retained.room() <= 0 or self._ahead():  # back-pressure: the process
                await self._wait_change()                       # blocks, nothing drops
            try:
                data = await read_chunk(src, self.retained.room())
            except OSError as exc:
                log.warning("%s: reading the process's output failed: %s", self.name, exc)
                data = b""
            if not data:
                self.eof = True
                self._moved()
                return
            self.retained.append(data)
            self._moved()

    def _ahead(self) -> bool:
        return self._sessions > 0 and self.retained.end - self.retained.sent >= READ_AHEAD

    def _complete(self) -> bool:
        return self.eof and self.retained.acked == self.retained.end

    async def _session(self, sock: socket.socket) -> bool:
        """Serve one host connection; True once everything is acknowledged, False when the
        connection ended first (the host may come back) or broke the protocol."""
        acks = SocketReader(sock)
        tasks = []
        served = False
        try:
            self.retained.resume(await acks.read_offset())
            self._sessions += 1
            served = True
            self._moved()
            position = [self.retained.acked]  # where this connection's sending is
            tasks = [asyncio.ensure_future(self._receive_acks(acks, position)),
                     asyncio.ensure_future(self._send(sock, position))]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            return done.pop().result()  # only the acks end well; a send ends by failing
        except ProtocolError as exc:
            log.warning("%s: the host broke the stream protocol (%s); connection closed", self.name, exc)
        except (EOFError, OSError) as exc:
            log.info("%s: the host's connection ended (%s); waiting for the next", self.name, exc)
        finally:
            if served:
                self._sessions -= 1
                self._moved()
            for task in tasks:
                task.cancel()
            sock.close()
        return False

    async def _receive_acks(self, acks: SocketReader, position: list) -> bool:
        while not (self.eof and self.retained.acked == self.retained.end):
            self.retained.ack(await acks.read_offset(), position[0])
            self._moved()
        return True

    async def _send(self, sock: socket.socket, position: list) -> None:
        """Send retained bytes from position[0] on, as they come; half-close after EOF."""
        while True:
            view = self.retained.view_at(position[0])
            if view:
                position[0] += await write_some(sock.fileno(), view)
                self.retained.sent = max(self.retained.sent, position[0])
                self._moved()
            elif self.eof:
                sock.shutdown(socket.SHUT_WR)
                await asyncio.get_running_loop().create_future()  # the acks decide the end
            else:
                await self._wait_change()


async def pump_stdin(accept, dst: int) -> None:
    """Host frames -> the process's stdin pipe `dst`, across host connections, until the frame
    of length 0; a connection that ends before it leaves stdin open for the next one."""

    async def session(sock: socket.socket) -> bool:
        frames = SocketReader(sock)
        try:
            while True:
                length = FRAME.unpack(await frames.read_exact(FRAME.size))[0]
                if length > MAX_FRAME:
                    raise ProtocolError(f"stdin frame of {length} bytes (at most {MAX_FRAME})")
                if not length:
                    return True
                data = await frames.read_exact(length)
                try:
                    await write_all(dst, data)
                except OSError as exc:
                    log.warning("stdin: the process's stdin is closed (%s)", exc)
                    return True
        except ProtocolError as exc:
            log.warning("stdin: the host broke the stream protocol (%s); connection closed", exc)
        except (EOFError, OSError) as exc:
            log.info("stdin: the host's connection ended (%s); waiting for the next", exc)
        finally:
            sock.close()
        return False

    await serve_newest(accept, session, grace=STDIN_GRACE_S)
