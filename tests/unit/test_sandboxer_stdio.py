"""Stdio relays between real FIFOs and the agent's own stream pumps.

The guest's vsock listeners are stood in for by the agent's `unix://PATH?ack` listeners, one per
port (the real vsock path is exercised by tests/vm/test_sandboxer*.py); everything else is real:
FIFOs opened the way containerd opens them, the relay tasks, the agent's resumable pumps, EOF,
the delivered marks a restarted daemon resumes from and the keepers holding FIFOs meanwhile.
"""

import asyncio
import os
import socket

import grpc
import pytest

from containerd_streams import WINDOW, ContainerdStream
from leak_guard import fail_if_left, take_left_in

from host_sandboxer.taskproxy import streaming
from host_sandboxer.taskproxy.delivered import DeliveredMark
from host_sandboxer.taskproxy.errors import HostError
from host_sandboxer.taskproxy.stdio import FifoSink, PortAllocator, ProcessStdio, _deliver_output
from host_sandboxer.taskproxy.streaming import StreamHub
from vmm_common import ttrpc
from vmm_common.fdio import write_all
from vmm_common.stdio_ack import ACK_EVERY, OFFSET
from vmm_task.container.endpoints import parse_endpoint
from vmm_task.container.resumable import ResumableOutput, pump_stdin


@pytest.fixture(autouse=True)
def no_keeper_left(tmp_path):
    """A FIFO keeper still running after the test (its stream's close() stops it) fails it."""
    yield
    fail_if_left(take_left_in(tmp_path))


class UnixPortTransport:
    """open_connection(port) to `<dir>/<port>`: where the guest's stand-ins listen."""

    def __init__(self, directory):
        self.directory = directory

    async def open_connection(self, port):
        return await asyncio.open_unix_connection(os.path.join(self.directory, str(port)))


class Guest:
    """The agent's side of streams: its listeners and pumps, with pipes for the process."""

    def __init__(self, directory):
        self.directory = directory
        self.tasks = []

    def _endpoint(self, port):
        return parse_endpoint("stream", f"unix://{self.directory}/{port}?ack")

    def output(self, port, data: bytes) -> ResumableOutput:
        endpoint = self._endpoint(port)
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        pump = ResumableOutput(f"port {port}")

        async def process():
            await write_all(write_end, data)
            os.close(write_end)

        async def run():
            try:
                await pump.run(read_end, endpoint.accept)
            finally:
                endpoint.close()
                os.close(read_end)

        self.tasks += [asyncio.create_task(process()), asyncio.create_task(run())]
        return pump

    def stdin(self, port) -> asyncio.Task:
        """Resolves to every byte the process's stdin got, once it was closed."""
        endpoint = self._endpoint(port)
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

        async def run():
            try:
                await pump_stdin(endpoint.accept, write_end)
            finally:
                endpoint.close()
                os.close(write_end)
            data = await asyncio.to_thread(_read_all, read_end)
            os.close(read_end)
            return data

        return asyncio.create_task(run())

    def close(self):
        for task in self.tasks:
            task.cancel()


def _keeper_of(mark_path):
    mark = DeliveredMark(mark_path)
    mark.close()
    return mark.keeper and mark.keeper["pid"]


def _running(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _read_all(fd):
    os.set_blocking(fd, True)
    chunks = []
    while data := os.read(fd, 65536):
        chunks.append(data)
    return b"".join(chunks)


async def read_fifo(path):
    fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
    try:
        return await asyncio.to_thread(_read_all, fd)
    finally:
        os.close(fd)


def test_ports_are_unique_and_resume_from_saved_next(tmp_path):
    ports = PortAllocator()
    for name in ("out", "err"):
        os.mkfifo(tmp_path / name)
    io = ProcessStdio.create("", str(tmp_path / "out"), str(tmp_path / "err"), ports, tmp_path)
    assert io.guest_paths() == {"stdin": "", "stdout": "vsock://2048?ack", "stderr": "vsock://2049?ack"}
    assert PortAllocator(ports.next).take() == 2050
    again = ProcessStdio.from_record(io.record(), tmp_path)
    assert (again.fifos, again.ports) == (io.fifos, io.ports)


def test_a_delivered_mark_reads_back_what_was_recorded(tmp_path):
    mark = DeliveredMark(tmp_path / "stdio" / "2048")
    mark.advance(1000)
    mark.advance(24)
    again = DeliveredMark(tmp_path / "stdio" / "2048")  # a restarted daemon
    assert (again.offset, again.finished) == (1024, False)
    again.finish()
    assert DeliveredMark(tmp_path / "stdio" / "2048").finished
    (tmp_path / "stdio" / "2049").write_bytes(b"short")
    assert DeliveredMark(tmp_path / "stdio" / "2049").offset == 0  # unusable: from the start
    again.remove()
    assert not (tmp_path / "stdio" / "2048").exists()


@pytest.mark.timeout(30)
def test_stdout_stdin_round_trip_with_eof(tmp_path):
    async def scenario():
        fifos = {n: str(tmp_path / n) for n in ("stdin", "stdout", "stderr")}
        for path in fifos.values():
            os.mkfifo(path)
        io = ProcessStdio.create(fifos["stdin"], fifos["stdout"], fifos["stderr"], PortAllocator(),
                                 tmp_path / "marks")
        payload = os.urandom(5 << 20)  # more than the agent's window: acks must flow
        guest = Guest(tmp_path)
        got_stdin = guest.stdin(io.ports["stdin"])
        guest.output(io.ports["stdout"], payload)
        guest.output(io.ports["stderr"], b"err\n")
        io.start(UnixPortTransport(str(tmp_path)))
        out_task = asyncio.create_task(read_fifo(fifos["stdout"]))
        err_task = asyncio.create_task(read_fifo(fifos["stderr"]))
        stdin_fd = await asyncio.to_thread(os.open, fifos["stdin"], os.O_WRONLY)
        os.write(stdin_fd, b"hello guest")
        os.close(stdin_fd)
        await io.stdin_done(5)
        await io.outputs_done(10)
        assert await asyncio.wait_for(got_stdin, 5) == b"hello guest"
        assert await out_task == payload
        assert await err_task == b"err\n"
        await io.close()
        guest.close()

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_a_guest_that_closes_once_all_is_acknowledged_ends_the_stream(tmp_path):
    """The ack that covers the last byte may come before the guest's EOF is read: the guest then
    closes at once, and the relay must end well, not fail on a final ack to a closed socket."""
    async def scenario():
        payload = os.urandom(ACK_EVERY)

        async def guest(reader, writer):  # a scripted guest: exactly the protocol, no slack
            assert OFFSET.unpack(await reader.readexactly(OFFSET.size))[0] == 0
            writer.write(payload)
            assert OFFSET.unpack(await reader.readexactly(OFFSET.size))[0] == len(payload)
            writer.close()

        server = await asyncio.start_unix_server(guest, str(tmp_path / "guest"))
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(write_end, False)
        received = asyncio.create_task(asyncio.to_thread(_read_all, read_end))
        mark = DeliveredMark(tmp_path / "stdio" / "2048")
        sink = FifoSink("pipe", write_end)
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "guest"))
        try:
            await _deliver_output(reader, writer, sink, mark)
        finally:
            writer.close()
            sink.close()
            server.close()
        assert await received == payload
        assert mark.offset == len(payload)
        os.close(read_end)

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_a_restarted_daemon_resumes_output_without_a_gap(tmp_path):
    async def scenario():
        out = str(tmp_path / "out")
        os.mkfifo(out)
        payload = os.urandom(8 << 20)
        first = ProcessStdio.create("", out, "", PortAllocator(), tmp_path / "marks")
        guest = Guest(tmp_path)
        pump = guest.output(first.ports["stdout"], payload)
        first.start(UnixPortTransport(str(tmp_path)))
        reader = await asyncio.to_thread(os.open, out, os.O_RDONLY)  # containerd reads to EOF
        got = bytearray()
        while len(got) < 3 << 20:
            got += await asyncio.to_thread(os.read, reader, 65536)
        for task in first._tasks.values():  # the daemon dies: no close(); marks and keeper stay
            task.cancel()
        await asyncio.sleep(0.1)
        assert pump.retained.acked < len(payload)
        mark = tmp_path / "marks" / str(first.ports["stdout"])
        keeper = _keeper_of(mark)
        assert _running(keeper), "a keeper holds the FIFO open while no daemon does"
        second = ProcessStdio.from_record(first.record(), tmp_path / "marks")
        second.start(UnixPortTransport(str(tmp_path)))
        got += await asyncio.wait_for(asyncio.to_thread(_read_all, reader), 20)  # EOF: keeper gone
        os.close(reader)
        assert len(got) == len(payload) and bytes(got) == payload
        assert pump.retained.acked == len(payload)
        await second.outputs_done(5)  # the relay ends after its keeper: containerd's EOF came first
        assert _keeper_of(mark) is None and not _running(keeper), "stopped: the stream is finished"
        await second.close()
        guest.close()

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_output_waits_for_a_restarted_containerd_to_read_on(tmp_path):
    """containerd restarting closes its reader of the FIFO and opens a new one: output written
    meanwhile waits in the FIFO (and in the guest) and reaches the new reader, none is lost."""
    async def scenario():
        out = str(tmp_path / "out")
        os.mkfifo(out)
        payload = os.urandom(4 << 20)
        io = ProcessStdio.create("", out, "", PortAllocator(), tmp_path / "marks")
        guest = Guest(tmp_path)
        guest.output(io.ports["stdout"], payload)
        io.start(UnixPortTransport(str(tmp_path)))
        first = await asyncio.to_thread(os.open, out, os.O_RDONLY)
        got = bytearray()
        while len(got) < 1 << 20:
            got += await asyncio.to_thread(os.read, first, 65536)
        os.close(first)  # containerd stops
        await asyncio.sleep(0.5)  # the guest writes on meanwhile
        second = os.open(out, os.O_RDONLY | os.O_NONBLOCK)  # the new containerd (who opens it
        reading = asyncio.create_task(asyncio.to_thread(_read_all, second))  # without waiting)
        await io.outputs_done(20)
        await io.close()  # its keeper goes: EOF
        got += await asyncio.wait_for(reading, 20)
        os.close(second)
        assert len(got) == len(payload) and bytes(got) == payload
        guest.close()

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_stdin_stays_open_across_a_containerd_restart(tmp_path):
    """containerd restarting closes its writer of the stdin FIFO and opens a new one: the
    process's stdin must not see EOF meanwhile (the relay holds a writer of its own until CloseIO,
    as containerd's runc shim does); what the new containerd writes reaches it, and CloseIO ends it."""
    async def scenario():
        stdin = str(tmp_path / "in")
        os.mkfifo(stdin)
        io = ProcessStdio.create(stdin, "", "", PortAllocator(), tmp_path / "marks")
        guest = Guest(tmp_path)
        got = guest.stdin(io.ports["stdin"])
        io.start(UnixPortTransport(str(tmp_path)))
        first = await asyncio.to_thread(os.open, stdin, os.O_WRONLY)
        os.write(first, b"before\n")
        os.close(first)  # containerd stops
        await asyncio.sleep(0.5)
        assert not got.done(), "the process's stdin was closed by containerd's restart"
        second = await asyncio.to_thread(os.open, stdin, os.O_WRONLY)  # the new containerd
        os.write(second, b"after\n")
        os.close(second)
        await io.stdin_done(5)  # CloseIO
        assert await asyncio.wait_for(got, 5) == b"before\nafter\n"
        await io.close()
        guest.close()

    asyncio.run(scenario())


@pytest.mark.timeout(20)
def test_close_unblocks_fifos_nobody_opened(tmp_path):
    async def scenario():
        out, stdin = str(tmp_path / "out"), str(tmp_path / "in")
        os.mkfifo(out)
        os.mkfifo(stdin)
        io = ProcessStdio.create(stdin, out, "", PortAllocator(), tmp_path / "marks")
        guest = Guest(tmp_path)
        guest.output(io.ports["stdout"], b"never read")
        io.start(UnixPortTransport(str(tmp_path)))
        await asyncio.sleep(0.2)
        await asyncio.wait_for(io.close(), 5)
        assert list((tmp_path / "marks").iterdir()) == []
        guest.close()

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_fifos_nobody_opens_yet_do_not_hold_up_other_relays(tmp_path):
    async def scenario():
        ports = PortAllocator()
        guest = Guest(tmp_path)
        idle = []
        for i in range(12):  # more than the default executor's threads on a small machine
            os.mkfifo(tmp_path / f"idle{i}")
            os.mkfifo(tmp_path / f"in{i}")
            idle.append(ProcessStdio.create(str(tmp_path / f"in{i}"), str(tmp_path / f"idle{i}"), "",
                                            ports, tmp_path / "marks"))
        os.mkfifo(tmp_path / "live")
        live = ProcessStdio.create("", str(tmp_path / "live"), "", ports, tmp_path / "marks")
        for io in idle + [live]:
            guest.output(io.ports["stdout"], b"out")
            io.start(UnixPortTransport(str(tmp_path)))
        assert await asyncio.wait_for(read_fifo(str(tmp_path / "live")), 10) == b"out"
        for io in idle + [live]:
            await asyncio.wait_for(io.close(), 5)
        guest.close()

    asyncio.run(scenario())


class TaskAddress:
    """The pod's task address as containerd reaches it for `io_type = "streaming"`: a ttrpc
    server with the daemon's Streaming service (the task relay in between is tested in
    tests/unit/test_task_relay*.py), and the stream strings CRI puts in Create/Exec."""

    def __init__(self, directory):
        self.path = os.path.join(directory, "task.sock")
        self.hub = StreamHub()
        self._server = ttrpc.Server()
        streaming.register(self._server, self.hub)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen()
        self._task = asyncio.ensure_future(self._server.serve(self._sock))

    def uri(self, stream_id: str) -> str:
        return f"ttrpc+unix://{self.path}?streaming_id={stream_id}"

    async def close(self):
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._sock.close()


@pytest.mark.timeout(30)
def test_containerd_streams_carry_stdin_stdout_stderr_exactly(tmp_path):
    """CRI's order: the streams are opened (and acknowledged) before Create; the relays take
    them and bridge them to the guest's acknowledged ports, within containerd's windows."""
    async def scenario():
        address = TaskAddress(tmp_path)
        streams = {n: await ContainerdStream.open(address.path, f"c1-{n}") for n in ("stdin", "stdout", "stderr")}
        io = ProcessStdio.create(*(address.uri(f"c1-{n}") for n in ("stdin", "stdout", "stderr")),
                                 PortAllocator(), tmp_path / "marks")
        payload = os.urandom(3 << 20)  # many windows, more than the agent's 2 MiB
        typed = os.urandom(60_000)  # two Data; within the stand-in pipe nobody reads meanwhile
        guest = Guest(tmp_path)
        got_stdin = guest.stdin(io.ports["stdin"])
        guest.output(io.ports["stdout"], payload)
        guest.output(io.ports["stderr"], b"err\n")
        io.start(UnixPortTransport(str(tmp_path)), address.hub)
        out = asyncio.ensure_future(streams["stdout"].read_all())
        err = asyncio.ensure_future(streams["stderr"].read_all())
        await streams["stdin"].write_all(typed)
        await streams["stdin"].close()
        assert await asyncio.wait_for(got_stdin, 10) == typed
        assert await asyncio.wait_for(out, 10) == payload
        assert await asyncio.wait_for(err, 10) == b"err\n"
        await io.outputs_done(5)
        for stream in streams.values():
            await stream.drop()
        await io.close()
        guest.close()
        await address.close()

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_a_stream_lost_with_containerd_goes_on_in_the_next_one(tmp_path):
    """containerd restarted: its connection closes without CloseSend, CRI opens the stream
    again with the same ID. The output goes on there; only what was in flight on the lost
    connection (at most the windows containerd had granted) is missing."""
    async def scenario():
        address = TaskAddress(tmp_path)
        first = await ContainerdStream.open(address.path, "c2-stdout")
        io = ProcessStdio.create("", address.uri("c2-stdout"), "", PortAllocator(), tmp_path / "marks")
        payload = b"".join(b"%d\n" % i for i in range(300_000))
        guest = Guest(tmp_path)
        guest.output(io.ports["stdout"], payload)
        io.start(UnixPortTransport(str(tmp_path)), address.hub)
        head = await first.read_all(until=b"\n")
        await first.drop()
        second = await ContainerdStream.open(address.path, "c2-stdout")
        tail = await asyncio.wait_for(second.read_all(), 10)
        assert payload.startswith(head) and payload.endswith(tail)
        assert len(payload) - 4 * WINDOW <= len(head) + len(tail) <= len(payload)
        await io.outputs_done(5)
        await second.drop()
        await io.close()
        guest.close()
        await address.close()

    asyncio.run(scenario())


def test_stream_strings_the_daemon_cannot_serve_are_refused(tmp_path):
    for uri, why in (("grpc+unix:///run/t.sock?streaming_id=x", "only streams over ttrpc"),
                     ("ttrpc+unix:///run/t.sock", "exactly one non-empty streaming_id"),
                     ("ttrpc+unix:///run/t.sock?streaming_id=a&streaming_id=b", "exactly one")):
        with pytest.raises(HostError, match=why) as refused:
            ProcessStdio.create("", uri, "", PortAllocator(), tmp_path)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.timeout(30)
def test_a_finished_stream_replayed_to_a_restarted_daemon_is_ended(tmp_path):
    """The daemon recorded a stream finished but was killed before containerd's call ended:
    the relay replays the call to the next daemon, which ends it (containerd's EOF) at once."""
    async def scenario():
        address = TaskAddress(tmp_path)
        io = ProcessStdio.create("", address.uri("c3-stdout"), "", PortAllocator(), tmp_path / "marks")
        DeliveredMark(tmp_path / "marks" / str(io.ports["stdout"])).finish()
        again = ProcessStdio.from_record(io.record(), tmp_path / "marks")  # the next daemon
        again.start(UnixPortTransport(str(tmp_path)), address.hub)
        replayed = await ContainerdStream.open(address.path, "c3-stdout")
        assert await asyncio.wait_for(replayed.read_all(), 5) == b""
        await replayed.drop()
        await again.close()
        await address.close()

    asyncio.run(scenario())
