"""Stdio over containerd's Streaming service (`io_type = "streaming"`) with the agent in dev mode.

`ContainerdStream` (tests/containerd_streams.py) opens a stream as containerd's CRI does: its own
ttrpc connection to the task address, StreamInit{id} and the ack, then ReadByteStream's and
WriteByteStream's windows, CloseSend being stdin's EOF. The Task requests carry the stream strings
CRI puts in Create/Exec: `ttrpc+unix://<task address>?streaming_id=<id>-stdout`."""
import asyncio
import hashlib

from google.protobuf import any_pb2

from containerd_streams import STREAMING, ContainerdStream, pack as _pack
from vmm_common import ttrpc
from vmm_common.protos.containerd.services.streaming.v1 import streaming_pb2
from vmm_common.protos.containerd.types.transfer import streaming_pb2 as transfer


def _uri(agent, stream_id: str) -> str:
    return f"ttrpc+unix://{agent.socket}?streaming_id={stream_id}"


def _expected(lines: int) -> bytes:
    return "".join(f"{i}\n" for i in range(1, lines + 1)).encode()


def test_container_output_exact_with_eof_on_streams_opened_before_create(agent, bundles):
    """CRI's order: the streams exist (acknowledged) before the task is created."""
    lines = 200_000  # ~1.3 MB: many windows
    bundle = bundles.make(["sh", "-c", f"seq 1 {lines}; echo to-stderr >&2; exit 3"])

    async def body(t):
        out = await ContainerdStream.open(agent.socket, f"{bundle.id}-stdout")
        err = await ContainerdStream.open(agent.socket, f"{bundle.id}-stderr")
        reading = asyncio.gather(out.read_all(), err.read_all())
        await t.create(bundle, stdout=_uri(agent, f"{bundle.id}-stdout"),
                       stderr=_uri(agent, f"{bundle.id}-stderr"))
        await t.start(bundle.id)
        status = await t.wait(bundle.id)
        stdout, stderr = await asyncio.wait_for(reading, 30)  # both streams ended
        await t.delete(bundle.id)
        await out.close()
        await err.close()
        return status, stdout, stderr

    status, stdout, stderr = agent.run(body)
    assert status == 3
    assert hashlib.sha256(stdout).digest() == hashlib.sha256(_expected(lines)).digest()
    assert stderr == b"to-stderr\n"


def test_stdin_from_the_stream_reaches_the_process(agent, bundles):
    """A stream opened after Create (a plain client's order); CloseSend is stdin's EOF."""
    bundle = bundles.make(["sh", "-c", "cat; echo cat-saw-eof"])
    sent = bytes(range(256)) * 2048  # 512 KiB, every byte value: many of the agent's windows

    async def body(t):
        await t.create(bundle, stdin=_uri(agent, f"{bundle.id}-stdin"),
                       stdout=_uri(agent, f"{bundle.id}-stdout"))
        await t.start(bundle.id)
        out = await ContainerdStream.open(agent.socket, f"{bundle.id}-stdout")
        reading = asyncio.ensure_future(out.read_all())
        stdin = await ContainerdStream.open(agent.socket, f"{bundle.id}-stdin")
        await stdin.write_all(sent)
        await stdin.close()
        status = await t.wait(bundle.id)
        received = await asyncio.wait_for(reading, 30)
        await t.delete(bundle.id)
        await out.close()
        return status, received

    status, received = agent.run(body)
    assert status == 0
    assert received == sent + b"cat-saw-eof\n"


def test_exec_with_streaming_stdio(agent, bundles):
    bundle = bundles.make(["sleep", "600"])

    async def body(t):
        await t.create(bundle)
        await t.start(bundle.id)
        try:
            ids = {name: f"{bundle.id}-ex-{name}" for name in ("stdin", "stdout", "stderr")}
            streams = {name: await ContainerdStream.open(agent.socket, stream_id)
                       for name, stream_id in ids.items()}
            await t.exec(bundle.id, "ex", ["sh", "-c", "tr a-z A-Z; echo done >&2; exit 5"],
                         **{name: _uri(agent, stream_id) for name, stream_id in ids.items()})
            await t.start(bundle.id, "ex")
            reading = asyncio.gather(streams["stdout"].read_all(), streams["stderr"].read_all())
            await streams["stdin"].write_all(b"hello streaming\n")
            await streams["stdin"].close()
            status = await t.wait(bundle.id, "ex")
            outputs = await asyncio.wait_for(reading, 30)
            await t.delete(bundle.id, "ex")
            for name in ("stdout", "stderr"):
                await streams[name].close()
            return status, outputs
        finally:
            await t.remove(bundle.id)

    status, (stdout, stderr) = agent.run(body)
    assert status == 5
    assert stdout == b"HELLO STREAMING\n"
    assert stderr == b"done\n"


def test_terminal_over_streams(agent, bundles):
    """CRI with tty: stdin and stdout streams, no stderr; the terminal echoes the input."""
    bundle = bundles.make(["sh", "-c", "read line; echo got:$line"], terminal=True)

    async def body(t):
        stdin = await ContainerdStream.open(agent.socket, f"{bundle.id}-stdin")
        out = await ContainerdStream.open(agent.socket, f"{bundle.id}-stdout")
        reading = asyncio.ensure_future(out.read_all())
        await t.create(bundle, terminal=True, stdin=_uri(agent, f"{bundle.id}-stdin"),
                       stdout=_uri(agent, f"{bundle.id}-stdout"))
        await t.start(bundle.id)
        await stdin.write_all(b"hello\n")
        status = await t.wait(bundle.id)
        received = await asyncio.wait_for(reading, 30)
        await stdin.close()
        await t.delete(bundle.id)
        await out.close()
        return status, received

    status, received = agent.run(body)
    assert status == 0
    assert received.replace(b"\r", b"") == b"hello\ngot:hello\n"


def test_a_stream_never_opened_delays_neither_exit_nor_delete(agent, bundles):
    """containerd never opens the stdout stream: the exit is reported after the usual 2 s of
    silence (docs/stdio.md), Delete releases the waiting endpoint."""
    bundle = bundles.make(["true"])

    async def body(t):
        await t.create(bundle, stdout=_uri(agent, f"{bundle.id}-stdout"))
        await t.start(bundle.id)
        status = await t.wait(bundle.id, timeout=10)
        await t.delete(bundle.id)
        return status

    assert agent.run(body) == 0


async def _open_again(socket_path, stream_id: str) -> ContainerdStream:
    """A restarted containerd opening `stream_id` again, once the agent saw the old connection
    go (a restart takes seconds; here the next connection may overtake the old one's EOF)."""
    for _ in range(100):
        try:
            return await ContainerdStream.open(socket_path, stream_id)
        except ttrpc.RpcError as e:
            if e.code != ttrpc.Code.ALREADY_EXISTS:
                raise
        await asyncio.sleep(0.05)
    raise AssertionError(f"stream {stream_id} stayed taken by the dropped connection")


def test_streams_go_on_after_containerd_restarts(agent, bundles):
    """containerd killed (connections closed without CloseSend) and started again: CRI opens the
    same IDs again; the process's stdin and stdout go on over the new streams."""
    bundle = bundles.make(["sh", "-c", "while read l; do echo out:$l; done; echo bye"])
    ids = {name: f"{bundle.id}-{name}" for name in ("stdin", "stdout")}

    async def body(t):
        stdin = await ContainerdStream.open(agent.socket, ids["stdin"])
        out = await ContainerdStream.open(agent.socket, ids["stdout"])
        await t.create(bundle, **{name: _uri(agent, i) for name, i in ids.items()})
        await t.start(bundle.id)
        await stdin.write_all(b"a\n")
        before = await asyncio.wait_for(out.read_all(until=b"out:a\n"), 10)
        await stdin.drop()
        await out.drop()
        out = await _open_again(agent.socket, ids["stdout"])
        stdin = await _open_again(agent.socket, ids["stdin"])
        reading = asyncio.ensure_future(out.read_all())
        await stdin.write_all(b"b\n")
        await stdin.close()
        status = await t.wait(bundle.id)
        after = await asyncio.wait_for(reading, 10)
        await t.delete(bundle.id)
        await out.close()
        return status, before, after

    status, before, after = agent.run(body)
    assert (status, before, after) == (0, b"out:a\n", b"out:b\nbye\n")


def test_bad_streaming_requests_are_named_errors(agent, bundles):
    bundle = bundles.make(["true"])

    async def body(t):
        from vmm_common.protos.containerd.task.v2 import shim_pb2 as pb
        errors = []
        for uri in (f"grpc+unix://{agent.socket}?streaming_id={bundle.id}-stdout",
                    f"ttrpc+unix://{agent.socket}",
                    f"ttrpc+tcp://127.0.0.1:1?streaming_id={bundle.id}-stdout"):
            errors.append(await t.error("Create", pb.CreateTaskRequest(
                id=bundle.id, bundle=str(bundle.path), rootfs=bundle.rootfs, stdout=uri)))
        client = await ttrpc.Client.connect_unix(str(agent.socket))
        try:
            stream = await client.stream(STREAMING, "Stream", any_pb2.Any, streaming_client=True,
                                         streaming_server=True)
            await stream.send(_pack(transfer.Data(data=b"not an init")))
            try:
                await stream.recv()
            except ttrpc.RpcError as e:
                errors.append(e)
            garbled = await client.stream(STREAMING, "Stream", any_pb2.Any,
                                          streaming_client=True, streaming_server=True)
            await garbled.send(any_pb2.Any(type_url=streaming_pb2.StreamInit.DESCRIPTOR.full_name,
                                           value=b"\xff\xff"))
            try:
                await garbled.recv()
            except ttrpc.RpcError as e:
                errors.append(e)
            taken = await ContainerdStream.open(agent.socket, "twice")
            second = await client.stream(STREAMING, "Stream", any_pb2.Any, streaming_client=True,
                                         streaming_server=True)
            await second.send(_pack(streaming_pb2.StreamInit(id="twice")))
            try:
                await second.recv()
            except ttrpc.RpcError as e:
                errors.append(e)
            await taken.close()
        finally:
            await client.close()
        return [(e.code, e.message) for e in errors]

    found = agent.run(body)
    assert [code for code, _ in found] == [ttrpc.Code.INVALID_ARGUMENT] * 5 + [
        ttrpc.Code.ALREADY_EXISTS]
    assert "ttrpc only" in found[0][1]
    assert "streaming_id" in found[1][1]
    assert "ttrpc+tcp" in found[2][1]
    assert "StreamInit" in found[3][1] and "StreamInit" in found[4][1]
    assert "twice" in found[5][1]
