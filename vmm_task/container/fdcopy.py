"""Byte pumps between non-blocking file descriptors on the event loop.

A read always waits for readability first: a FIFO opened O_RDONLY|O_NONBLOCK before any writer
reads as EOF, but epoll reports it neither readable nor hung up until a writer has come and gone,
so waiting first is what makes "EOF" mean the writer really closed.
"""

import asyncio
import errno
import os
import time

CHUNK = 1 << 20
F_SETPIPE_SZ = 1031


def set_nonblocking(fd: int) -> int:
    os.set_blocking(fd, False)
    return fd


def widen_pipe(fd: int, size: int = CHUNK) -> None:
    """Raise a pipe's capacity (fewer wake-ups per MB); best effort (limited by pipe-max-size)."""
    import fcntl
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, size)
    except OSError:
        pass


async def _ready(fd: int, add, remove) -> None:
    future = asyncio.get_running_loop().create_future()
    add(fd, lambda: future.done() or future.set_result(None))
    try:
        await future
    finally:
        remove(fd)


async def wait_readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    await _ready(fd, loop.add_reader, loop.remove_reader)


async def read_chunk(fd: int) -> bytes:
    """The next bytes of `fd`, b"" at EOF (a pty master reports EIO once its slave is closed)."""
    await wait_readable(fd)
    while True:
        try:
            return os.read(fd, CHUNK)
        except BlockingIOError:
            await wait_readable(fd)
        except OSError as e:
            if e.errno == errno.EIO:
                return b""
            raise


def read_available(fd: int) -> bytes:
    """Whatever `fd` holds right now without waiting (b"" when nothing or EOF)."""
    parts = []
    while True:
        try:
            data = os.read(fd, CHUNK)
        except (BlockingIOError, OSError):
            break
        if not data:
            break
        parts.append(data)
    return b"".join(parts)


async def write_all(fd: int, data: bytes) -> None:
    """Write every byte; raises OSError (e.g. BrokenPipeError) when the reader is gone."""
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            await _ready(fd, loop.add_writer, loop.remove_writer)
            continue
        view = view[written:]


class Pump:
    """Copies `src` to `dst` until EOF of `src`. When `dst` fails (its reader went away), the rest
    is read and dropped so the container never blocks on a full pipe. `progress` is the monotonic
    time bytes last moved, used to bound how long an exit waits for a silent stream."""

    def __init__(self, name: str):
        self.name = name
        self.progress = time.monotonic()
        self.copied = 0
        self.error: str = ""

    async def run(self, src: int, dst: int) -> None:
        while True:
            data = await read_chunk(src)
            if not data:
                return
            self.progress = time.monotonic()
            if dst >= 0:
                try:
                    await write_all(dst, data)
                    self.copied += len(data)
                except OSError as e:
                    self.error = f"{self.name}: {e}"
                    dst = -1
            self.progress = time.monotonic()
