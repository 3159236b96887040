"""Reads and writes of non-blocking file descriptors on the event loop, for pumps on both sides.

A read always waits for readability first: a FIFO opened O_RDONLY|O_NONBLOCK before any writer
reads as EOF, but epoll reports it neither readable nor hung up until a writer has come and gone,
so waiting first is what makes "EOF" mean the writer really closed.
"""

import asyncio
import errno
import os
import socket

CHUNK = 1 << 20


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


async def wait_writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    await _ready(fd, loop.add_writer, loop.remove_writer)


async def read_chunk(fd: int, size: int = CHUNK) -> bytes:
    """The next bytes of `fd` (at most `size`), b"" at EOF (a pty master reports EIO once its
    slave is closed)."""
    await wait_readable(fd)
    while True:
        try:
            return os.read(fd, size)
        except BlockingIOError:
            await wait_readable(fd)
        except OSError as e:
            if e.errno == errno.EIO:
                return b""
            raise


async def write_some(fd: int, data) -> int:
    """One successful write of a prefix of `data` (waiting while `fd` is full); raises OSError
    (e.g. BrokenPipeError) when the reader is gone."""
    while True:
        try:
            return os.write(fd, data)
        except BlockingIOError:
            await wait_writable(fd)


async def write_all(fd: int, data) -> None:
    """Write every byte; raises OSError (e.g. BrokenPipeError) when the reader is gone."""
    view = memoryview(data)
    while view:
        view = view[await write_some(fd, view):]


async def read_line(sock, limit: int) -> bytes:
    """The next line of a non-blocking stream socket, newline included, and not one byte more:
    what follows stays in the socket for whoever reads it next (a handshake line, then the
    stream it opens). Stops at EOF or after `limit` bytes without a newline: the caller tells
    a complete line by its newline."""
    line = b""
    while len(line) < limit:
        await wait_readable(sock.fileno())
        try:
            ahead = sock.recv(limit - len(line), socket.MSG_PEEK)
        except BlockingIOError:
            continue
        if not ahead:
            break
        line += sock.recv((ahead.find(b"\n") + 1) or len(ahead))
        if line.endswith(b"\n"):
            break
    return line
