"""Run a program through the Reaper and collect its stdout/stderr (feeding it stdin).

For short commands whose output fits in memory (the debug ExecVMProcess, runtime calls that
report errors on stderr). Pipes are read with loop readers: no asyncio subprocess, whose child
watcher would call waitpid behind the Reaper's back.
"""

import asyncio
import os
import signal
from typing import NamedTuple, Sequence

from vmm_task.reaper import Reaper

MAX_OUTPUT = 2 * 2**20   # per stream; a ttrpc message must stay under 4 MiB
LINGER_S = 0.2           # after exit, how long to wait for output still in flight


class OutputTooLarge(Exception):
    pass


class Captured(NamedTuple):
    code: int        # exit code, or 128 + signal
    stdout: bytes
    stderr: bytes


async def run_capture(reaper: Reaper, argv: Sequence[str], stdin: bytes = b"",
                      max_output: int = MAX_OUTPUT) -> Captured:
    """Run `argv` to completion. A background process the command leaves behind may hold the
    pipes open: output is taken until the command exits plus LINGER_S, not until EOF.
    Cancelling the caller kills the command. Raises OutputTooLarge past `max_output`."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        child = await reaper.spawn(argv, stdin=in_r, stdout=out_w, stderr=err_w)
    except BaseException:
        for fd in (in_w, out_r, err_r):
            os.close(fd)
        raise
    finally:
        for fd in (in_r, out_w, err_w):
            os.close(fd)
    def kill() -> None:
        if child.status is None:
            os.kill(child.pid, signal.SIGKILL)

    collectors = [_Collector(out_r, max_output, kill), _Collector(err_r, max_output, kill)]
    feeder = asyncio.ensure_future(_feed(in_w, stdin))
    try:
        status = await child.wait()
        await asyncio.wait([c.task for c in collectors], timeout=LINGER_S)
        for collector in collectors:
            if collector.overflow:
                raise OutputTooLarge(f"{argv[0]} wrote more than {max_output} bytes")
        return Captured(status.code, bytes(collectors[0].data), bytes(collectors[1].data))
    except BaseException:
        kill()
        raise
    finally:
        # stop the readers/writer before closing their fds, so no loop reader outlives its fd
        tasks = [feeder] + [c.task for c in collectors]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for collector in collectors:
            os.close(collector.fd)


class _Collector:
    """Reads one pipe to EOF in the background; `data` holds what arrived. Past `limit` it
    stops and calls `on_overflow` (which kills the writer rather than let it block)."""

    def __init__(self, fd: int, limit: int, on_overflow):
        self.fd = fd
        self.data = bytearray()
        self.overflow = False
        os.set_blocking(fd, False)
        self.task = asyncio.ensure_future(self._run(limit, on_overflow))

    async def _run(self, limit: int, on_overflow) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                await _ready(self.fd, write=False)
                continue
            if not chunk:
                return
            self.data += chunk
            if len(self.data) > limit:
                self.overflow = True
                on_overflow()
                return


async def _feed(fd: int, data: bytes) -> None:
    """Write `data` to the child's stdin, then close it (EOF); a child that exits early is fine."""
    try:
        os.set_blocking(fd, False)
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                await _ready(fd, write=True)
    except BrokenPipeError:
        pass
    finally:
        os.close(fd)


async def _ready(fd: int, write: bool) -> None:
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if write else (loop.add_reader,
                                                                         loop.remove_reader)
    add(fd, lambda: future.done() or future.set_result(None))
    try:
        await future
    finally:
        remove(fd)
