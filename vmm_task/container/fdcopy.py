"""Byte pumps between non-blocking file descriptors on the event loop (reads: vmm_common.fdio)."""

import os
import time

from vmm_common.fdio import CHUNK, read_chunk, write_all

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
