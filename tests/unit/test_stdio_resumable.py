"""The agent's acknowledged streams (vmm_task/container/resumable.py) at the pump level.

Host connections are socketpairs handed to the pump's `accept` (in the VM they are vsock
connections: tests/vm/test_stdio_resume_vm.py); the process's side is a real pipe.
"""

import asyncio
import os
import socket

import pytest

from vmm_common.fdio import wait_readable
from vmm_common.stdio_ack import FRAME, MAX_FRAME, OFFSET, ProtocolError, frame
from vmm_task.container.fdcopy import widen_pipe
from vmm_task.container.resumable import Retained, ResumableOutput, pump_stdin


def test_retained_frees_on_ack_and_resends_from_any_retained_offset():
    kept = Retained(window=10)
    kept.append(b"abcd")
    kept.append(b"efgh")
    assert kept.room() == 2
    kept.sent = 6
    kept.ack(3, limit=6)
    assert (kept.acked, kept.room(), bytes(kept.view_at(3))) == (3, 5, b"d")
    assert bytes(kept.view_at(5)) == b"fgh" and bytes(kept.view_at(8)) == b""
    kept.resume(6)  # a new connection: the host delivered 6
    assert bytes(kept.view_at(6)) == b"gh" and kept.room() == 8


@pytest.mark.parametrize("offset, limit", [(2, 6), (7, 6), (5, 4)])
def test_retained_refuses_offsets_it_cannot_serve(offset, limit):
    kept = Retained()
    kept.append(b"0123456789")
    kept.sent = 6
    kept.ack(3, limit=6)
    with pytest.raises(ProtocolError):
        kept.ack(offset, limit)  # behind what is freed, or past what was sent
    assert kept.acked == 3


class Host:
    """The host's end of the socketpairs the pump accepts, one per `connect()`."""

    def __init__(self):
        self.pending: asyncio.Queue = asyncio.Queue()

    async def accept(self):
        return await self.pending.get()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        await self.pending.put(theirs)
        return await asyncio.open_connection(sock=ours)


async def _read(reader, count: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(count), 5)


async def _pipe_read(fd: int, count: int) -> bytes:
    """`count` bytes from a non-blocking pipe, as they come (within 5 s)."""
    got = b""
    async with asyncio.timeout(5):
        while len(got) < count:
            await wait_readable(fd)
            got += os.read(fd, count - len(got))
    return got


def _pipe():
    """A pipe that holds what the tests write at once (the process's stand-in never blocks)."""
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    widen_pipe(write_end)
    return read_end, write_end


def test_output_is_resent_from_the_offset_a_new_connection_names():
    async def scenario():
        src, sink = _pipe()
        data = os.urandom(200_000)
        os.write(sink, data[:100_000])
        host, pump = Host(), ResumableOutput("stdout")
        running = asyncio.ensure_future(pump.run(src, host.accept))
        reader, writer = await host.connect()
        writer.write(OFFSET.pack(0))
        first = await _read(reader, 100_000)
        writer.write(OFFSET.pack(60_000))  # delivered 60 000, then the host dies
        await writer.drain()
        writer.close()
        os.write(sink, data[100_000:])
        os.close(sink)
        reader, writer = await host.connect()
        writer.write(OFFSET.pack(60_000))
        rest = await asyncio.wait_for(reader.read(), 5)  # until the pump's half-close
        assert first + rest[40_000:] == data and rest[:40_000] == data[60_000:100_000]
        assert not running.done(), "finished only when the host acknowledged everything"
        writer.write(OFFSET.pack(len(data)))
        await asyncio.wait_for(running, 5)
        assert pump.retained.acked == pump.retained.end == len(data)
        writer.close()
        os.close(src)

    asyncio.run(scenario())


def test_a_newer_connection_supersedes_one_the_pump_still_holds():
    async def scenario():
        src, sink = _pipe()
        os.write(sink, b"hello")
        host, pump = Host(), ResumableOutput("stdout")
        running = asyncio.ensure_future(pump.run(src, host.accept))
        old_reader, old_writer = await host.connect()
        old_writer.write(OFFSET.pack(0))
        assert await _read(old_reader, 5) == b"hello"
        reader, writer = await host.connect()  # the old one is never closed by the host
        writer.write(OFFSET.pack(2))
        assert await _read(reader, 3) == b"llo"
        assert await asyncio.wait_for(old_reader.read(), 5) == b"", "the pump closed the old one"
        os.close(sink)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.write(OFFSET.pack(5))
        await asyncio.wait_for(running, 5)
        old_writer.close()
        writer.close()
        os.close(src)

    asyncio.run(scenario())


class Watermark(Retained):
    """Retained that records the most bytes it ever held unacknowledged."""

    def __init__(self, window: int):
        super().__init__(window)
        self.most = 0

    def append(self, data: bytes) -> None:
        super().append(data)
        self.most = max(self.most, self.end - self.acked)


def test_a_full_window_stops_reading_the_process_until_acks_come():
    """Whenever the pump reads, it holds at most the window unacknowledged: checked at every
    read of the whole stream, not at one moment after a pause."""
    async def scenario():
        src, sink = _pipe()
        data = os.urandom(10_000)
        host, pump = Host(), ResumableOutput("stdout", window=4096)
        pump.retained = Watermark(4096)
        running = asyncio.ensure_future(pump.run(src, host.accept))
        os.write(sink, data)
        os.close(sink)
        reader, writer = await host.connect()
        writer.write(OFFSET.pack(0))
        got = b""
        while len(got) < len(data):
            got += await _read(reader, min(4096, len(data) - len(got)))
            writer.write(OFFSET.pack(len(got)))
        assert got == data
        await asyncio.wait_for(running, 5)
        assert pump.retained.most == 4096, "nothing read past the window while unacknowledged"
        writer.close()
        os.close(src)

    asyncio.run(scenario())


@pytest.mark.parametrize("bad_offset", [1, 10])
def test_a_host_naming_an_offset_never_sent_loses_only_that_connection(bad_offset):
    async def scenario():
        src, sink = _pipe()
        os.write(sink, b"abc")
        os.close(sink)
        host, pump = Host(), ResumableOutput("stdout")
        running = asyncio.ensure_future(pump.run(src, host.accept))
        reader, writer = await host.connect()
        writer.write(OFFSET.pack(bad_offset))  # nothing was ever sent
        assert await asyncio.wait_for(reader.read(), 5) == b""
        reader, writer = await host.connect()
        writer.write(OFFSET.pack(0))
        assert await asyncio.wait_for(reader.read(), 5) == b"abc"
        writer.write(OFFSET.pack(99))  # an ack past what was sent: the same
        assert await asyncio.wait_for(reader.read(), 5) == b""
        reader, writer = await host.connect()
        writer.write(OFFSET.pack(0))
        assert await asyncio.wait_for(reader.read(), 5) == b"abc"
        writer.write(OFFSET.pack(3))
        await asyncio.wait_for(running, 5)
        os.close(src)

    asyncio.run(scenario())


def test_stdin_frames_survive_a_lost_connection_and_end_on_the_empty_frame():
    async def scenario():
        dst_read, dst = _pipe()
        host = Host()
        running = asyncio.ensure_future(pump_stdin(host.accept, dst))
        _, writer = await host.connect()
        writer.write(frame(b"one\n") + FRAME.pack(100) + b"cut")  # the host dies mid-frame
        await writer.drain()
        writer.close()
        _, writer = await host.connect()
        writer.write(frame(b"two\n"))
        assert await _pipe_read(dst_read, 8) == b"one\ntwo\n", "the next connection still feeds stdin"
        assert not running.done(), "stdin stays open across connections"
        writer.write(frame(b""))
        await asyncio.wait_for(running, 5)
        writer.close()
        for fd in (dst_read, dst):
            os.close(fd)

    asyncio.run(scenario())


def test_an_oversized_stdin_frame_closes_only_that_connection():
    async def scenario():
        dst_read, dst = _pipe()
        host = Host()
        running = asyncio.ensure_future(pump_stdin(host.accept, dst))
        reader, writer = await host.connect()
        writer.write(FRAME.pack(MAX_FRAME + 1))
        assert await asyncio.wait_for(reader.read(), 5) == b""
        _, writer = await host.connect()
        writer.write(frame(b"ok") + frame(b""))
        await asyncio.wait_for(running, 5)
        assert os.read(dst_read, 100) == b"ok"
        writer.close()
        for fd in (dst_read, dst):
            os.close(fd)

    asyncio.run(scenario())
