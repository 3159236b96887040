"""Stdio through the agent: 100 MB of stdout through a FIFO arriving intact and in order before
Wait answers, a stdin round trip ended by the writer's EOF and by CloseIO, and a terminal with
ResizePty, and the acknowledged stream form resuming on a new connection."""
import asyncio
import hashlib
import os

from vmm_common.protos.containerd.task.v2 import shim_pb2 as pb
from vmm_common.stdio_ack import OFFSET, frame

LINES = 13_000_000  # `seq 1 LINES` is ~100 MB, every line distinct: a lost or moved byte shows


def _expected_seq() -> tuple[int, str]:
    digest, size, block = hashlib.sha256(), 0, 100_000
    for start in range(1, LINES + 1, block):
        chunk = "".join(f"{i}\n" for i in range(start, min(start + block, LINES + 1))).encode()
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


async def _read_fifo(fd: int) -> tuple[int, str]:
    """Read a FIFO to EOF on the loop; epoll reports nothing until a writer came, so an early
    read never mistakes "no writer yet" for EOF."""
    loop = asyncio.get_running_loop()
    digest, size = hashlib.sha256(), 0
    while True:
        readable = loop.create_future()
        loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
        try:
            await readable
        finally:
            loop.remove_reader(fd)
        try:
            data = os.read(fd, 1 << 20)
        except BlockingIOError:
            continue
        if not data:
            return size, digest.hexdigest()
        digest.update(data)
        size += len(data)


def test_100mb_stdout_arrives_intact_before_wait_returns(agent, bundles):
    bundle = bundles.make(["seq", "1", str(LINES)])
    fifo = bundle.file("stdout.fifo")
    os.mkfifo(fifo)
    expected = _expected_seq()

    async def body(t):
        reader_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            reading = asyncio.ensure_future(_read_fifo(reader_fd))
            await t.create(bundle, stdout=str(fifo))
            await t.start(bundle.id)
            assert await t.wait(bundle.id, timeout=120) == 0
            # the agent reported the exit only after the last byte went into the FIFO
            got = await asyncio.wait_for(reading, 30)
            await t.delete(bundle.id)
            return got
        finally:
            os.close(reader_fd)

    assert agent.run(body, timeout=180) == expected


def test_wait_answers_only_after_the_last_byte_is_written(agent, bundles):
    lines = 2_000_000
    bundle = bundles.make(["seq", "1", str(lines)])
    out = bundle.file("out")
    expected = sum(len(str(i)) + 1 for i in range(1, lines + 1))

    async def body(t):
        await t.create(bundle, stdout=str(out))
        await t.start(bundle.id)
        assert await t.wait(bundle.id) == 0
        size_at_exit = out.stat().st_size  # before Delete: nothing may still be in flight
        await t.delete(bundle.id)
        return size_at_exit

    assert agent.run(body) == expected


def _open_writer(path) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    os.set_blocking(fd, True)
    return fd


def test_stdin_round_trip_ends_on_writer_eof_and_on_close_io(agent, bundles):
    payload = os.urandom(3 << 20)

    async def one(t, use_close_io: bool) -> bytes:
        bundle = bundles.make(["cat"])
        stdin, out = bundle.file("stdin.fifo"), bundle.file("out")
        os.mkfifo(stdin)
        await t.create(bundle, stdin=str(stdin), stdout=str(out))
        writer = _open_writer(stdin)  # the agent opened its reading end at Create
        await t.start(bundle.id)
        await asyncio.get_running_loop().run_in_executor(None, os.write, writer, payload)
        if use_close_io:
            await t.call("CloseIO", pb.CloseIORequest(id=bundle.id, stdin=True))
            assert (await t.state(bundle.id)).status  # still answering while cat drains
        else:
            os.close(writer)
        assert await t.wait(bundle.id) == 0
        if use_close_io:
            os.close(writer)
        await t.delete(bundle.id)
        return out.read_bytes()

    async def body(t):
        return await one(t, use_close_io=False), await one(t, use_close_io=True)

    by_eof, by_close_io = agent.run(body)
    assert hashlib.sha256(by_eof).digest() == hashlib.sha256(payload).digest()
    assert hashlib.sha256(by_close_io).digest() == hashlib.sha256(payload).digest()


def test_terminal_resize_and_input(agent, bundles):
    script = "stty size; read line; echo got:$line; stty size"
    bundle = bundles.make(["sh", "-c", script], terminal=True)
    stdin, out = bundle.file("stdin.fifo"), bundle.file("out")
    os.mkfifo(stdin)

    async def body(t):
        await t.create(bundle, terminal=True, stdin=str(stdin), stdout=str(out))
        writer = _open_writer(stdin)
        await t.call("ResizePty", pb.ResizePtyRequest(id=bundle.id, width=123, height=45))
        await t.start(bundle.id)
        while "45 123" not in out.read_text(errors="replace"):
            await asyncio.sleep(0.05)
        await t.call("ResizePty", pb.ResizePtyRequest(id=bundle.id, width=80, height=24))
        os.write(writer, b"hello\n")
        assert await t.wait(bundle.id) == 0
        os.close(writer)
        state = await t.state(bundle.id)
        assert state.terminal
        await t.delete(bundle.id)

    agent.run(body)
    text = out.read_text(errors="replace").replace("\r", "")
    assert text.splitlines()[0] == "45 123"
    assert "got:hello" in text and text.rstrip().endswith("24 80")


def test_exec_with_a_terminal(agent, bundles):
    bundle = bundles.make(["sleep", "1000"])
    stdin, out = bundle.file("exec-in.fifo"), bundle.file("exec-out")
    os.mkfifo(stdin)

    async def body(t):
        await t.create(bundle)
        await t.start(bundle.id)
        await t.exec(bundle.id, "tty", ["sh", "-c", "tty; read go; stty size"], terminal=True,
                     stdin=str(stdin), stdout=str(out))
        resize = pb.ResizePtyRequest(id=bundle.id, exec_id="tty", width=99, height=11)
        early = await t.error("ResizePty", resize)  # the terminal exists from Start on
        await t.start(bundle.id, "tty")
        writer = _open_writer(stdin)
        await t.call("ResizePty", resize)
        os.write(writer, b"\n")
        assert await t.wait(bundle.id, "tty") == 0
        os.close(writer)
        await t.remove(bundle.id)
        return early

    early = agent.run(body)
    assert early.code.name == "FAILED_PRECONDITION"
    lines = [line for line in out.read_text().replace("\r", "").splitlines() if line]
    assert lines[0].startswith("/dev/pts/") and lines[-1] == "11 99"


def test_acknowledged_streams_resume_on_a_new_connection(agent, bundles):
    """`unix://PATH?ack` (dev mode's stand-in for `vsock://PORT?ack`): the host's first
    connection ends mid-stream, having delivered only part of what it got; the next names that
    offset and gets the rest, without a gap; stdin stays open across the two and ends on the
    empty frame. The container reads a line, then writes a counter, then echoes its stdin."""
    lines = 300_000
    bundle = bundles.make(["sh", "-c", f"read first; seq 1 {lines}; echo got:$first; cat"])
    out_path, in_path = bundle.file("out.sock"), bundle.file("in.sock")
    expected = "".join(f"{i}\n" for i in range(1, lines + 1)).encode() + b"got:one\ntwo\n"

    async def connect(path, offset=None):
        reader, writer = await asyncio.open_unix_connection(str(path))
        if offset is not None:
            writer.write(OFFSET.pack(offset))
        return reader, writer

    async def body(t):
        await t.create(bundle, stdin=f"unix://{in_path}?ack", stdout=f"unix://{out_path}?ack")
        await t.start(bundle.id)
        _, stdin = await connect(in_path)
        stdin.write(frame(b"one\n"))
        reader, writer = await connect(out_path, 0)
        first = await reader.readexactly(500_000)
        writer.write(OFFSET.pack(300_000))  # the host delivered this much, then died
        await writer.drain()
        writer.close()
        stdin.close()
        reader, writer = await connect(out_path, 300_000)
        _, stdin = await connect(in_path)
        stdin.write(frame(b"two\n") + frame(b""))
        rest = b""
        while not rest.endswith(b"two\n"):
            rest += await asyncio.wait_for(reader.read(1 << 20), 30)
        assert await asyncio.wait_for(reader.read(), 30) == b"", "half-closed after the last byte"
        writer.write(OFFSET.pack(300_000 + len(rest)))
        assert await t.wait(bundle.id) == 0
        writer.close()
        stdin.close()
        await t.delete(bundle.id)
        return first, rest

    first, rest = agent.run(body)
    assert first[:300_000] + rest == expected
    assert rest[:200_000] == first[300_000:], "what was not acknowledged is sent again"
