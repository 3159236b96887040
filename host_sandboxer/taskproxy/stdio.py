"""Relays between containerd's stdio FIFOs on the host and a process's streams in the guest.

Convention (Kuasar's): the host tells the guest `vsock://<port>` for each stream it wants;
the agent listens on that vsock port and the host connects through the pod's transport
(`open_connection(port)`), one connection per stream. stdin: FIFO → guest, then a half-close
(the guest closes the process's stdin); stdout/stderr: guest → FIFO until the guest closes.
"""

import asyncio
import concurrent.futures
import errno
import logging
import os

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
CONNECT_RETRY_S = 0.02
# Threads that wait for containerd to open stdin FIFOs (an open blocks): their own pool, so a
# FIFO nobody opens never starves the loop's default executor.
_STDIN_OPENS = concurrent.futures.ThreadPoolExecutor(max_workers=256, thread_name_prefix="stdin-open")


class PortAllocator:
    """vsock ports for stdio streams of one pod, never reused while the pod lives.

    `next` is saved in the pod's state so a restarted daemon keeps counting."""

    FIRST = 2048

    def __init__(self, next_port: int = FIRST):
        self.next = next_port

    def take(self) -> int:
        port, self.next = self.next, self.next + 1
        return port


def guest_uri(port: int) -> str:
    return f"vsock://{port}"


async def _fifo_reader(path: str) -> asyncio.StreamReader:
    """stdin: wait (in a thread: FIFO opens block) until containerd opens its writing end.
    Reading before that would see EOF, which is what a closed writer looks like too."""
    loop = asyncio.get_running_loop()
    fd = await loop.run_in_executor(_STDIN_OPENS, os.open, path, os.O_RDONLY | os.O_CLOEXEC)
    reader = asyncio.StreamReader(limit=CHUNK)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                 os.fdopen(fd, "rb", buffering=0))
    return reader


async def _fifo_writer(path: str) -> asyncio.StreamWriter:
    """stdout/stderr: open once containerd reads the FIFO (ENXIO until then), without a thread."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            await asyncio.sleep(CONNECT_RETRY_S)
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin,
                                                        os.fdopen(fd, "wb", buffering=0))
    return asyncio.StreamWriter(transport, protocol, None, loop)


def _release_blocked_open(path: str, flags: int) -> None:
    """Unblock a thread stuck opening `path` by briefly opening the other end ourselves."""
    try:
        os.close(os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC))
    except OSError:
        pass


async def _connect(transport, port: int, deadline: float):
    """Connect to the guest's listener on `port`, retrying while it is not yet listening."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return await transport.open_connection(port)
        except (ConnectionError, OSError) as exc:
            if loop.time() >= deadline:
                raise ConnectionError(f"guest stdio port {port} not reachable: {exc}") from exc
            await asyncio.sleep(CONNECT_RETRY_S)


class ProcessStdio:
    """The relays of one process (init or exec). Holds ports and tasks; `close()` ends them."""

    def __init__(self, stdin: str, stdout: str, stderr: str, ports: PortAllocator, terminal: bool = False):
        # With a terminal, stdout carries everything: the agent ignores a stderr stream.
        self.fifos = {"stdin": stdin, "stdout": stdout, "stderr": "" if terminal else stderr}
        self.ports = {name: ports.take() for name, path in self.fifos.items() if path}
        self._tasks: dict[str, asyncio.Task] = {}

    def guest_paths(self) -> dict[str, str]:
        """The stdin/stdout/stderr strings the guest receives in place of the FIFO paths."""
        return {name: guest_uri(self.ports[name]) if name in self.ports else ""
                for name in self.fifos}

    def start(self, transport, connect_timeout: float = 10.0) -> None:
        """Begin relaying; connections are retried until the guest listens (after Create/Exec)."""
        deadline = asyncio.get_running_loop().time() + connect_timeout
        for name, port in self.ports.items():
            relay = self._stdin_relay if name == "stdin" else self._output_relay
            self._tasks[name] = asyncio.create_task(
                relay(self.fifos[name], transport, port, deadline), name=f"stdio-{name}-{port}")

    async def _stdin_relay(self, fifo: str, transport, port: int, deadline: float) -> None:
        reader, writer = await _connect(transport, port, deadline)
        try:
            source = await _fifo_reader(fifo)
            while data := await source.read(CHUNK):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            await writer.drain()
            # Keep the connection until the guest closes it so the half-close is delivered.
            await reader.read()
        finally:
            writer.close()

    async def _output_relay(self, fifo: str, transport, port: int, deadline: float) -> None:
        reader, writer = await _connect(transport, port, deadline)
        sink = None
        try:
            sink = await _fifo_writer(fifo)
            while data := await reader.read(CHUNK):
                sink.write(data)
                await sink.drain()
        except (BrokenPipeError, ConnectionResetError):
            log.info("stdio %s: containerd closed the reader; dropping the rest", fifo)
        finally:
            if sink is not None:
                sink.close()
            writer.close()

    async def stdin_done(self, timeout: float) -> None:
        """Wait until stdin's FIFO reached EOF and was forwarded (before CloseIO goes on)."""
        await self._wait(["stdin"], timeout)

    async def outputs_done(self, timeout: float) -> None:
        """Wait until stdout/stderr drained into their FIFOs (before an exit is reported)."""
        await self._wait(["stdout", "stderr"], timeout)

    async def _wait(self, names, timeout: float) -> None:
        tasks = [self._tasks[n] for n in names if n in self._tasks]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def close(self) -> None:
        """Stop every relay, unblocking FIFO opens still waiting for containerd."""
        for name, task in self._tasks.items():
            if not task.done():
                if name == "stdin":
                    _release_blocked_open(self.fifos[name], os.O_WRONLY)
                task.cancel()
        for name, task in self._tasks.items():
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # noqa: BLE001 - a failed relay is logged, not raised
                if not (isinstance(exc, OSError) and exc.errno == errno.EPIPE):
                    log.warning("stdio %s relay for %s ended: %s", name, self.fifos[name], exc)
