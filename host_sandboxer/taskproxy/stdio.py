"""Relays between containerd's stdio FIFOs on the host and a process's streams in the guest.

The host tells the guest `vsock://<port>?ack` for each stream it wants (Kuasar's convention plus
the acknowledged protocol of vmm_common.stdio_ack); the agent listens on that port for the life
of the process and the host connects through the pod's transport (`open_connection(port)`).
Output: guest → FIFO with plain writes, the delivered offset recorded after each one
(delivered.py) and acknowledged to the guest, which resends the rest to a restarted daemon.
Stdin: FIFO → guest in frames, a frame of length 0 for the FIFO's EOF, which comes once
containerd closed its writer and CloseIO came: until then the relay holds a writer of its own, as
containerd's runc shim does, so a containerd restart (which closes containerd's writer and opens
a new one) does not end the process's stdin. While a stream runs a keeper process holds its FIFO
open (fifo_keeper.py), so containerd sees no EOF while the daemon is down. With `io_type =
"streaming"` a stdio string names a Stream call of containerd's on the task address instead of a
FIFO (streaming.py), relayed the same way. What a process's relays are (stdio strings, ports) is
in the pod's record: `record()` / `from_record()`.
"""

import asyncio
import errno
import logging
import os
from pathlib import Path

from host_sandboxer.taskproxy import fifo_keeper
from host_sandboxer.taskproxy.delivered import DeliveredMark
from host_sandboxer.taskproxy.fifos import check_fifo, open_fifo
from host_sandboxer.taskproxy.streaming import StreamHub, StreamSink, StreamSource, stream_id
from host_sandboxer.vmm import process
from vmm_common.fdio import read_chunk, write_some
from vmm_common.stdio_ack import ACK_EVERY, ACK_SUFFIX, OFFSET, frame

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
CONNECT_RETRY_S = 0.02
CONNECT_TIMEOUT_S = 10.0
RECONNECT_DELAY_S = 0.2  # after a lost connection: a guest resetting every one cannot spin us
STREAMS = ("stdin", "stdout", "stderr")


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
    return f"vsock://{port}{ACK_SUFFIX}"


async def _open_fifo_writer(name: str, path: str) -> int:
    """stdout/stderr: open once containerd reads the FIFO (ENXIO until then), without a thread."""
    while True:
        try:
            return open_fifo(name, path, os.O_WRONLY)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            await asyncio.sleep(CONNECT_RETRY_S)


async def _connect(transport, port: int):
    """Connect to the guest's listener on `port`, retrying while it is not yet listening."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CONNECT_TIMEOUT_S
    while True:
        try:
            return await transport.open_connection(port)
        except (ConnectionError, OSError) as exc:
            if loop.time() >= deadline:
                raise ConnectionError(f"guest stdio port {port} not reachable: {exc}") from exc
            await asyncio.sleep(CONNECT_RETRY_S)


async def _until_closed(reader: asyncio.StreamReader) -> None:
    """Wait for the guest to close, discarding (bounded reads) whatever it sends meanwhile."""
    while await reader.read(CHUNK):
        pass


class FifoSink:
    """containerd's output FIFO, written with plain non-blocking writes so that what the mark
    counts as delivered is in the FIFO. It holds a reader of its own too, never read, as
    containerd's shims do: containerd closes its reader when it restarts, and a write must then
    wait (the FIFO's buffer fills, the guest holds the rest, the container is held back) for the
    new containerd to read on, not fail and lose the rest of the stream."""

    def __init__(self, path: str, fd: int, held: int = -1):
        self.path, self.fd, self.held = path, fd, held

    @classmethod
    async def open(cls, stream: str, path: str) -> "FifoSink":
        fd = await _open_fifo_writer(stream, path)
        return cls(path, fd, open_fifo(stream, path, os.O_RDONLY))

    async def write(self, data: bytes, mark: DeliveredMark) -> None:
        view = memoryview(data)
        while view:
            written = await write_some(self.fd, view)
            mark.advance(written)
            view = view[written:]

    async def end(self) -> None:
        """The stream's EOF is the keeper's release (ProcessStdio._release)."""

    def close(self) -> None:
        for fd in (self.fd, self.held):
            if fd >= 0:
                os.close(fd)
        self.fd = self.held = -1


class FifoSource:
    """containerd's stdin FIFO: bytes until containerd closed its writer."""

    def __init__(self, fd: int):
        self.fd = fd

    async def read(self) -> bytes:
        return await read_chunk(self.fd, CHUNK)

    async def delivered(self, count: int) -> None:
        """The FIFO's own buffer is containerd's flow control."""

    def close(self) -> None:
        os.close(self.fd)


async def _deliver_output(reader, writer, sink, mark: DeliveredMark) -> None:
    """One connection: the guest resends from `mark.offset`; each write is recorded, then acked."""
    writer.write(OFFSET.pack(mark.offset))
    acked = mark.offset
    while data := await reader.read(CHUNK):
        await sink.write(data, mark)
        if mark.offset - acked >= ACK_EVERY:
            writer.write(OFFSET.pack(mark.offset))
            acked = mark.offset
            await writer.drain()
    # the guest half-closed after its last byte: acknowledge all, and the stream is done. If the
    # last ack above already did, the guest may have closed: a second one would fail and reconnect.
    if mark.offset != acked:
        writer.write(OFFSET.pack(mark.offset))
        await writer.drain()
    await sink.end()


async def _send_stdin(source, reader, writer) -> None:
    """One connection: containerd's bytes in frames until its EOF, then the end frame."""
    while data := await source.read():
        writer.write(frame(data))
        await writer.drain()
        await source.delivered(len(data))
    writer.write(frame(b""))
    await writer.drain()
    await _until_closed(reader)  # the guest closes once it closed the process's stdin


class ProcessStdio:
    """The relays of one process (init or exec). Holds ports and tasks; `close()` ends them.
    `marks_dir` (the pod's `stdio/`) keeps one DeliveredMark per stream, by port."""

    def __init__(self, fifos: dict[str, str], ports: dict[str, int], marks_dir: Path):
        self.fifos = fifos
        self.ports = ports
        self._marks = {name: DeliveredMark(marks_dir / str(port)) for name, port in ports.items()}
        self._keepers: dict = {}  # by stream: the process holding its FIFO open
        self._stdin_writer: int | None = None  # our own writer of the stdin FIFO, until CloseIO
        self._stdin_closed = False  # CloseIO came: no writer of our own any more
        self._tasks: dict[str, asyncio.Task] = {}
        self._streams: StreamHub | None = None  # the pod's Stream calls, given by start()
        self._replayed: list[asyncio.Task] = []  # ending calls replayed for finished streams

    @classmethod
    def create(cls, stdin: str, stdout: str, stderr: str, ports: PortAllocator, marks_dir: Path,
               terminal: bool = False) -> "ProcessStdio":
        # With a terminal, stdout carries everything: the agent ignores a stderr stream.
        fifos = {"stdin": stdin, "stdout": stdout, "stderr": "" if terminal else stderr}
        for name, path in fifos.items():
            if path and stream_id(name, path) is None:
                check_fifo(name, path)
        return cls(fifos, {name: ports.take() for name, path in fifos.items() if path}, marks_dir)

    def record(self) -> dict:
        return {"fifos": self.fifos, "ports": self.ports}

    @classmethod
    def from_record(cls, record: dict, marks_dir: Path) -> "ProcessStdio":
        fifos = {name: str(record["fifos"][name]) for name in STREAMS}
        return cls(fifos, {name: int(port) for name, port in record["ports"].items()
                           if name in STREAMS}, marks_dir)

    def guest_paths(self) -> dict[str, str]:
        """The stdin/stdout/stderr strings the guest receives in place of the FIFO paths."""
        return {name: guest_uri(self.ports[name]) if name in self.ports else ""
                for name in self.fifos}

    def start(self, transport, streams: StreamHub | None = None) -> None:
        """Begin (or, in a restarted daemon, resume) relaying; connections are retried until the
        guest listens (after Create/Exec), and made again when one is lost. `streams`: the
        pod's Stream calls, for stdio strings that name one."""
        self._streams = streams
        for name, port in self.ports.items():
            self._tasks[name] = asyncio.create_task(self._stream(name, transport, port),
                                                    name=f"stdio-{name}-{port}")
            ident = stream_id(name, self.fifos[name])
            if self._marks[name].finished and ident is not None:
                self._replayed.append(asyncio.create_task(self._end_replayed(ident)))

    async def _end_replayed(self, ident: str) -> None:
        """A stream finished by a daemon killed before its end frame left it: the task relay
        replays containerd's call, which is ended here (containerd waits for that EOF)."""
        (await self._streams.take(ident)).finish()

    async def _stream(self, name: str, transport, port: int) -> None:
        """One stream's relay. Once it finished or failed its keeper goes, so containerd sees EOF
        (containerd waits for that before it deletes the process); a relay cancelled because the
        daemon leaves keeps it, for the next daemon."""
        try:
            if not self._marks[name].finished:
                relay = self._stdin_relay if name == "stdin" else self._output_relay
                await relay(name, transport, port)
        except Exception:
            await self._release(name)
            raise
        await self._release(name)

    async def _output_relay(self, name: str, transport, port: int) -> None:
        mark = self._marks[name]
        ident = stream_id(name, self.fifos[name])
        if ident is None:
            sink = await FifoSink.open(name, self.fifos[name])
        else:
            sink = StreamSink(self._streams, ident)
        try:
            if ident is None:
                await self._keep(name, sink.fd)
            await self._reconnecting(name, transport, port,
                                     lambda reader, writer: _deliver_output(reader, writer, sink, mark))
        finally:
            sink.close()

    async def _stdin_relay(self, name: str, transport, port: int) -> None:
        # At once, writer or not: a read waits for readability first (vmm_common.fdio), which
        # a FIFO never had a writer does not report, so EOF means containerd closed stdin.
        ident = stream_id(name, self.fifos[name])
        if ident is None:
            source = FifoSource(open_fifo(name, self.fifos[name], os.O_RDONLY))
            if not self._stdin_closed:
                self._stdin_writer = open_fifo(name, self.fifos[name], os.O_WRONLY)
        else:
            source = StreamSource(self._streams, ident)
        try:
            if ident is None:
                await self._keep(name, source.fd)
            await self._reconnecting(name, transport, port,
                                     lambda reader, writer: _send_stdin(source, reader, writer))
        finally:
            self._close_stdin_writer()
            source.close()

    def _close_stdin_writer(self) -> None:
        if self._stdin_writer is not None:
            os.close(self._stdin_writer)
            self._stdin_writer = None

    async def _keep(self, name: str, fd: int) -> None:
        """Make sure a keeper holds the stream's FIFO: the one a previous daemon left, or a new one."""
        mark = self._marks[name]
        keeper = process.adopt(mark.keeper)
        if keeper is None:
            try:
                keeper = await fifo_keeper.spawn(fd, mark.path)
            except OSError as exc:
                log.warning("stdio %s: no keeper (%s): a daemon restart would end this stream "
                            "for containerd", self.fifos[name], exc)
                return
            mark.set_keeper(process.identity(keeper))
        self._keepers[name] = keeper

    async def _release(self, name: str) -> None:
        mark = self._marks[name]
        keeper = self._keepers.pop(name, None) or process.adopt(mark.keeper)
        if keeper is not None:
            await fifo_keeper.stop(keeper)
        if mark.keeper is not None:
            mark.set_keeper(None)

    async def _reconnecting(self, name: str, transport, port: int, relay) -> None:
        """Run `relay` on a guest connection until it completes; a lost connection is made
        again (the guest resumes output; stdin bytes in flight on it are lost)."""
        while True:
            reader, writer = await _connect(transport, port)
            try:
                await relay(reader, writer)
                self._marks[name].finish()
                return
            except ConnectionError as exc:
                log.warning("stdio %s: connection to guest port %d lost (%s); reconnecting",
                            self.fifos[name], port, exc)
            finally:
                writer.close()
            await asyncio.sleep(RECONNECT_DELAY_S)

    async def stdin_done(self, timeout: float) -> None:
        """CloseIO: containerd closed its writer; close ours, and wait until the FIFO reached EOF
        and it was forwarded (before CloseIO goes on)."""
        self._stdin_closed = True
        self._close_stdin_writer()
        await self._wait(["stdin"], timeout)

    async def outputs_done(self, timeout: float) -> None:
        """Wait until stdout/stderr drained into their FIFOs (before an exit is reported)."""
        await self._wait(["stdout", "stderr"], timeout)

    async def _wait(self, names, timeout: float) -> None:
        tasks = [self._tasks[n] for n in names if n in self._tasks]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def close(self) -> None:
        """Stop every relay and keeper; the process is deleted, so its marks go too."""
        for task in self._replayed:
            task.cancel()
        for task in self._tasks.values():
            task.cancel()
        for name, task in self._tasks.items():
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # noqa: BLE001 - a failed relay is logged, not raised
                log.warning("stdio %s relay for %s ended: %s", name, self.fifos[name], exc)
        await self.release_keepers()
        for mark in self._marks.values():
            mark.remove()

    async def release_keepers(self) -> None:
        """No stream of this process will be relayed again (its VM is gone): stop the keepers,
        so containerd sees EOF (it waits for that before it deletes the process)."""
        for name in self._marks:
            await self._release(name)
