"""Stdio of one container process (init or exec), without losing or reordering a byte.

Without a terminal each requested stream is a pipe: the runtime hands the child ends to the
process, the agent pumps the other ends to/from the endpoints (endpoints.py). With a terminal the
runtime passes the pty master over the console socket; stdout carries the terminal's output and
stdin feeds it. An endpoint in the acknowledged form (`?ack`) is pumped by resumable.py instead:
its host may reconnect (a restarted daemon) and resume where it was. `drain()` is awaited before
an exit is reported, so a Wait caller has every byte (the runc shim does the same); it stops
waiting only when a stream stays silent for `idle` seconds without EOF (a daemonised child still
holding the pipe).
"""

import asyncio
import logging
import os
import time
from typing import NamedTuple, Optional

from vmm_common.fdio import read_chunk, wait_readable, write_all

from . import console as consolemod
from . import resumable
from .endpoints import Endpoint, ListenerEndpoint, parse_endpoint
from .errors import TaskError
from .fdcopy import Pump, read_available, set_nonblocking, widen_pipe

log = logging.getLogger(__name__)

EOT = b"\x04"
CONSOLE_TIMEOUT = 5.0  # seconds for the runtime to pass the pty master after create/exec


class Stdio(NamedTuple):
    """The stdio a Create or Exec asks for: endpoint strings (endpoints.py), "" for none."""
    stdin: str
    stdout: str
    stderr: str
    terminal: bool


class ProcessIO:
    def __init__(self, stdin: str, stdout: str, stderr: str, terminal: bool,
                 console_path: str, uid: int = 0, gid: int = 0):
        self.stdin, self.stdout, self.stderr, self.terminal = stdin, stdout, stderr, terminal
        self._console_path = console_path
        self._owner = (uid, gid)
        self._endpoints: list[Optional[Endpoint]] = []
        self._console: Optional[consolemod.ConsoleSocket] = None
        self._console_task: Optional[asyncio.Task] = None
        self.master: Optional[int] = None
        self._child_fds: list[Optional[int]] = [None, None, None]
        self._our_fds: list[Optional[int]] = [None, None, None]
        self._outputs: list[tuple[Pump | resumable.ResumableOutput, asyncio.Task]] = []
        self._stdin_task: Optional[asyncio.Task] = None
        self._stdin_close = asyncio.get_running_loop().create_future()
        try:  # last: a bad string releases the endpoints parsed before it (close() needs the above)
            for name, uri in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr)):
                self._endpoints.append(parse_endpoint(name, uri) if uri else None)
        except BaseException:
            self.close()
            raise

    # -- before the runtime runs --------------------------------------------------------------

    def prepare(self) -> tuple[Optional[str], tuple]:
        """Returns (console socket path or None, the three fds to give the runtime)."""
        if self.terminal:
            self._console = consolemod.ConsoleSocket(self._console_path)
            self._console_task = asyncio.ensure_future(self._console.receive_master())
            return self._console_path, (None, None, None)
        for index, endpoint in enumerate(self._endpoints):
            if endpoint is None:
                continue
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            widen_pipe(read_end)
            child, ours = (read_end, write_end) if index == 0 else (write_end, read_end)
            os.fchown(child, *self._owner)
            self._child_fds[index], self._our_fds[index] = child, set_nonblocking(ours)
        return None, tuple(self._child_fds)

    async def started(self) -> None:
        """The runtime created the process: take the terminal, drop the child ends, start pumps."""
        self._close_child_fds()
        if self.terminal:
            try:
                self.master = await asyncio.wait_for(self._console_task, CONSOLE_TIMEOUT)
            except asyncio.TimeoutError:
                raise TaskError("UNKNOWN", f"the runtime passed no terminal on {self._console_path}"
                                           f" within {CONSOLE_TIMEOUT:.0f}s") from None
            self._console.close()
            self._our_fds = [os.dup(self.master), os.dup(self.master), None]
            if self._endpoints[0] is None:
                os.close(self._our_fds[0])
                self._our_fds[0] = None
        stdin = self._endpoints[0]
        if stdin is not None and self._our_fds[0] is not None and stdin.acked:
            self._stdin_task = asyncio.ensure_future(self._pump_stdin_acked(stdin))
        elif stdin is not None and self._our_fds[0] is not None:
            # a FIFO is opened before the RPC returns, as the runc shim does: the client may
            # open its writing end (O_NONBLOCK) as soon as Create/Start answered
            src = None if stdin.reader_waits else await stdin.open_reader()
            self._stdin_task = asyncio.ensure_future(self._pump_stdin(stdin, src))
        for index in (1, 2):
            endpoint, src = self._endpoints[index], self._our_fds[index]
            if endpoint is None or src is None:
                continue
            name = ("stdout", "stderr")[index - 1]
            if endpoint.acked:
                pump = resumable.ResumableOutput(name)
                task = asyncio.ensure_future(self._pump_out_acked(pump, endpoint, index))
            else:
                pump = Pump(name)
                task = asyncio.ensure_future(self._pump_out(pump, endpoint, index))
            self._outputs.append((pump, task))

    # -- while it runs --------------------------------------------------------------------------

    async def _pump_out(self, pump: Pump, endpoint: Endpoint, index: int) -> None:
        src = self._our_fds[index]
        dst = -1
        try:
            try:
                dst = await endpoint.open_writer()
            except OSError as e:
                pump.error = f"{pump.name}: cannot open {endpoint.uri}: {e}"
                log.warning("%s", pump.error)
            await pump.run(src, dst)
            if pump.error:
                log.info("output dropped after a failure: %s", pump.error)
            if dst >= 0:
                os.close(dst)
                dst = -1
                await endpoint.delivered()
        finally:
            if dst >= 0:
                os.close(dst)
            self._close_ours(index)

    async def _pump_out_acked(self, pump: resumable.ResumableOutput, endpoint: ListenerEndpoint,
                              index: int) -> None:
        try:
            await pump.run(self._our_fds[index], endpoint.accept)
        except OSError as e:
            log.warning("%s %s: %s", pump.name, endpoint.uri, e)
        finally:
            endpoint.close()
            self._close_ours(index)

    async def _pump_stdin_acked(self, endpoint: ListenerEndpoint) -> None:
        """Host frames -> process until the end-of-stdin frame, or CloseIO, which closes stdin at
        once: the daemon first sends the end-of-stdin frame and waits for the guest to take it."""
        pumping = asyncio.ensure_future(resumable.pump_stdin(endpoint.accept, self._our_fds[0]))
        try:
            await asyncio.wait({pumping, self._stdin_close}, return_when=asyncio.FIRST_COMPLETED)
            if pumping.done() and pumping.exception() is not None:
                log.warning("stdin %s: %s", endpoint.uri, pumping.exception())
        finally:
            pumping.cancel()
            endpoint.close()  # a host connecting again is refused: this stdin is over
            if self.terminal and self.master is not None:
                _write_quietly(self._our_fds[0], EOT)
            self._close_ours(0)

    async def _pump_stdin(self, endpoint: Endpoint, src: Optional[int]) -> None:
        """Endpoint -> process until EOF or CloseIO; CloseIO first forwards what is readable."""
        dst = self._our_fds[0]
        try:
            if src is None:
                src = -1
                opening = asyncio.ensure_future(endpoint.open_reader())
                await asyncio.wait({opening, self._stdin_close},
                                   return_when=asyncio.FIRST_COMPLETED)
                if not opening.done():
                    opening.cancel()
                    return
                src = opening.result()
            while True:
                readable = asyncio.ensure_future(wait_readable(src))
                await asyncio.wait({readable, self._stdin_close}, return_when=asyncio.FIRST_COMPLETED)
                if not readable.done():
                    readable.cancel()
                    await write_all(dst, read_available(src))
                    return
                data = await read_chunk(src)
                if not data:
                    return
                await write_all(dst, data)
        except OSError as e:
            log.warning("stdin %s: %s", endpoint.uri, e)
        finally:
            if src >= 0:
                os.close(src)
            if self.terminal and self.master is not None:
                _write_quietly(self._our_fds[0], EOT)
            self._close_ours(0)

    async def close_stdin(self) -> None:
        """CloseIO: the process sees EOF on stdin (EOT on a terminal) after what was sent."""
        if not self._stdin_close.done():
            self._stdin_close.set_result(None)
        if self._stdin_task is not None:
            await asyncio.shield(self._stdin_task)

    def resize(self, width: int, height: int) -> None:
        consolemod.resize(self.master, width, height)

    async def drain(self, idle: float = 2.0) -> None:
        """Wait until every output stream reached EOF, or stayed silent for `idle` seconds."""
        for pump, task in self._outputs:
            while not task.done():
                await asyncio.wait({task}, timeout=min(idle, 0.5))
                if not task.done() and time.monotonic() - pump.progress > idle:
                    log.info("%s still open %.1fs after exit; reporting the exit", pump.name, idle)
                    break

    # -- teardown -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every pump and release every fd and socket (Delete, or a failed create)."""
        for task in [self._stdin_task, self._console_task] + [t for _, t in self._outputs]:
            if task is not None and not task.done():
                task.cancel()
        if self._console is not None:
            self._console.close()
        for endpoint in self._endpoints:
            if endpoint is not None:
                endpoint.close()
        self._close_child_fds()
        for index in range(3):
            self._close_ours(index)
        if self.master is not None:
            os.close(self.master)
            self.master = None

    def _close_child_fds(self) -> None:
        for index, fd in enumerate(self._child_fds):
            if fd is not None:
                os.close(fd)
                self._child_fds[index] = None

    def _close_ours(self, index: int) -> None:
        fd = self._our_fds[index]
        if fd is not None:
            self._our_fds[index] = None
            os.close(fd)


def _write_quietly(fd: Optional[int], data: bytes) -> None:
    if fd is None:
        return
    try:
        os.write(fd, data)
    except OSError:
        pass
