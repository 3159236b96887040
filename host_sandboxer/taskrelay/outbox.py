"""What is still to be written to one non-blocking socket, written as the peer reads.

A write never blocks the loop (in the relay it carries every pod's task calls): what the socket
does not take now is queued, the loop's writability callback sends the rest, and `size` lets
the owner bound the queue (a peer that stops reading is dropped, not buffered for without end).
Chunks are kept as given (a kept request frame is queued, not copied). Works on the relay's
Reactor and on asyncio's loop alike (add_writer/remove_writer); the daemon's side also passes
listening sockets with a chunk (SCM_RIGHTS). `written` counts the bytes the socket took, so an
owner can tell when something it queued is out of its hands.
"""
import array
import collections
import socket


class Outbox:
    def __init__(self, loop, sock: socket.socket, on_error, on_written=None):
        """`on_error(reason)` runs (once) when the socket fails; the owner closes it.
        `on_written()`, if given, runs after queued bytes were written from the loop."""
        self._loop = loop
        self._sock = sock
        self._on_error = on_error
        self._on_written = on_written
        self._chunks: collections.deque[list] = collections.deque()  # [memoryview, socket to pass]
        self.size = 0
        self.queued = 0   # bytes ever queued
        self.written = 0  # bytes ever taken by the socket
        self._watching = False
        self._failed = False

    def write(self, *chunks: bytes, passing: socket.socket | None = None) -> None:
        """Queue `chunks`; `passing` (a socket) goes along with the first byte and is closed
        once sent."""
        idle = not self._chunks
        for chunk in chunks:
            if chunk:
                self._chunks.append([memoryview(chunk), passing])
                self.size += len(chunk)
                self.queued += len(chunk)
                passing = None
        if idle and self._chunks and not self._failed:
            self._flush()  # nothing was waiting: try at once (a queue waits for the loop)
            if self._chunks and not self._failed:
                self._watching = True
                self._loop.add_writer(self._sock.fileno(), self._flush_later)

    def _flush_later(self) -> None:
        self._flush()
        if self._on_written is not None:
            self._on_written()

    def _flush(self) -> None:
        while self._chunks:
            chunk, passing = self._chunks[0]
            try:
                if passing is None:
                    sent = self._sock.send(chunk)
                else:
                    sent = self._sock.sendmsg([chunk], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                         array.array("i", [passing.fileno()]))])
                    passing.close()
                    self._chunks[0][1] = None
            except BlockingIOError:
                return
            except OSError as e:
                self._failed = True
                self.close()
                self._on_error(str(e))
                return
            self.size -= sent
            self.written += sent
            if sent == len(chunk):
                self._chunks.popleft()
            else:
                self._chunks[0][0] = chunk[sent:]
                return
        self._unwatch()

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            self._loop.remove_writer(self._sock.fileno())

    def pending(self) -> bytes:
        """What is not written yet (for a re-exec that hands the socket on)."""
        return b"".join(chunk for chunk, _ in self._chunks)

    def close(self) -> None:
        """Stop writing (before the owner closes the socket)."""
        self._unwatch()
        for _, passing in self._chunks:
            if passing is not None:
                passing.close()
        self._chunks.clear()
        self.size = 0
