"""Unary ttrpc calls over a real unix socket: errors, concurrency, deadlines, metadata.

`serving()` and `raw_exchange()` are shared by the other test_ttrpc_* files.
"""
import asyncio
import contextlib
import os
import random
import socket
import tempfile
import time

from google.protobuf import empty_pb2, wrappers_pb2

from vmm_common import ttrpc
from vmm_common.protos.ttrpc.request_pb2 import Request, Response
from vmm_common.ttrpc import frame as fr

SERVICE = "test.Echo"


async def echo(req, ctx):
    return wrappers_pb2.StringValue(value=req.value)


async def sleep(req, ctx):
    await asyncio.sleep(req.value)
    return empty_pb2.Empty()


async def fail(req, ctx):
    raise ValueError("disk on fire")


async def exit_process(req, ctx):
    raise SystemExit(3)


async def refuse(req, ctx):
    raise ttrpc.RpcError(ttrpc.Code.NOT_FOUND, f"container {req.value} not found")


async def show_metadata(req, ctx):
    return wrappers_pb2.StringValue(value=repr(sorted(ctx.metadata.items())))


async def remaining(req, ctx):
    return wrappers_pb2.DoubleValue(value=ctx.time_remaining() or -1.0)


async def forget_to_return(req, ctx):
    return None


async def count(req, stream, ctx):
    for i in range(req.value):
        await stream.send(wrappers_pb2.StringValue(value=str(i)))
    if ctx.get("fail-after"):
        raise ttrpc.RpcError(ttrpc.Code.ABORTED, "stopped on purpose")


async def total(stream, ctx):
    return wrappers_pb2.Int64Value(value=sum([m.value async for m in stream]))


async def ignore_stream(stream, ctx):
    await asyncio.sleep(30)


async def shout(stream, ctx):
    async for message in stream:
        await stream.send(wrappers_pb2.StringValue(value=message.value.upper()))


METHODS = {
    "Echo": ttrpc.unary(wrappers_pb2.StringValue, echo),
    "Sleep": ttrpc.unary(wrappers_pb2.DoubleValue, sleep),
    "Fail": ttrpc.unary(empty_pb2.Empty, fail),
    "Exit": ttrpc.unary(empty_pb2.Empty, exit_process),
    "Refuse": ttrpc.unary(wrappers_pb2.StringValue, refuse),
    "Metadata": ttrpc.unary(empty_pb2.Empty, show_metadata),
    "Remaining": ttrpc.unary(empty_pb2.Empty, remaining),
    "ForgetToReturn": ttrpc.unary(empty_pb2.Empty, forget_to_return),
    "Count": ttrpc.server_stream(wrappers_pb2.Int32Value, count),
    "Total": ttrpc.client_stream(wrappers_pb2.Int64Value, total),
    "Shout": ttrpc.bidi_stream(wrappers_pb2.StringValue, shout),
    "Ignore": ttrpc.client_stream(wrappers_pb2.StringValue, ignore_stream),
}


@contextlib.asynccontextmanager
async def serving(server: ttrpc.Server | None = None):
    """`server` (by default one with the test service) on a fresh unix socket; yields its path."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ttrpc.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen()
        if server is None:
            server = ttrpc.Server()
            server.register(SERVICE, METHODS)
        task = asyncio.create_task(server.serve(sock))
        try:
            yield path
            assert not task.done(), "the server stopped serving"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            sock.close()


@contextlib.asynccontextmanager
async def client_of(path):
    client = await ttrpc.Client.connect_unix(path)
    try:
        yield client
    finally:
        await client.close()


async def raw_exchange(path, raw: bytes, timeout=5.0) -> bytes:
    """Write bytes to a fresh connection and end our side; read until the server closes."""
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(raw)
    writer.write_eof()
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def request_frame(sid, method, payload=b"", flags=0, **fields) -> bytes:
    request = Request(service=SERVICE, method=method, payload=payload, **fields)
    return fr.encode(sid, fr.REQUEST, flags, request.SerializeToString())


async def read_response(reader) -> tuple[fr.Frame, Response]:
    frame = await fr.read_frame(reader)
    assert frame.type == fr.RESPONSE
    return frame, Response.FromString(frame.data)


def run(coro, timeout=30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def expect_error(code, coro):
    async def go():
        try:
            await coro
        except ttrpc.RpcError as e:
            assert e.code == code, e
            return e.message
        raise AssertionError(f"expected {code.name}")
    return go()


def test_unary_round_trip_of_a_large_message():
    async def go():
        async with serving() as path, client_of(path) as client:
            text = "x" * (3 << 20)
            reply = await client.call(SERVICE, "Echo", wrappers_pb2.StringValue(value=text),
                                      wrappers_pb2.StringValue, timeout=10)
            assert reply.value == text
    run(go())


def test_unknown_service_and_method_are_unimplemented_by_name():
    async def go():
        async with serving() as path, client_of(path) as client:
            message = await expect_error(ttrpc.Code.UNIMPLEMENTED, client.call(
                "no.Such", "Echo", empty_pb2.Empty(), empty_pb2.Empty))
            assert "no.Such" in message
            message = await expect_error(ttrpc.Code.UNIMPLEMENTED, client.call(
                SERVICE, "Nope", empty_pb2.Empty(), empty_pb2.Empty))
            assert f"{SERVICE}/Nope" in message
    run(go())


def test_handler_failures_are_statuses_and_the_connection_stays_up():
    async def go():
        async with serving() as path, client_of(path) as client:
            message = await expect_error(ttrpc.Code.INTERNAL, client.call(
                SERVICE, "Fail", empty_pb2.Empty(), empty_pb2.Empty))
            assert message == "ValueError: disk on fire"
            message = await expect_error(ttrpc.Code.NOT_FOUND, client.call(
                SERVICE, "Refuse", wrappers_pb2.StringValue(value="c1"), empty_pb2.Empty))
            assert message == "container c1 not found"
            message = await expect_error(ttrpc.Code.INTERNAL, client.call(
                SERVICE, "Exit", empty_pb2.Empty(), empty_pb2.Empty))
            assert message == "SystemExit: 3"  # PID 1 must not exit because a handler did
            message = await expect_error(ttrpc.Code.INTERNAL, client.call(
                SERVICE, "ForgetToReturn", empty_pb2.Empty(), empty_pb2.Empty))
            assert "returned NoneType" in message
            reply = await client.call(SERVICE, "Echo", wrappers_pb2.StringValue(value="still"),
                                      wrappers_pb2.StringValue)
            assert reply.value == "still"
    run(go())


def test_fifty_concurrent_calls_on_one_connection():
    async def go():
        async with serving() as path, client_of(path) as client:
            rng = random.Random(50)
            delays = [rng.uniform(0.05, 0.3) for _ in range(50)]

            async def one(i):
                await client.call(SERVICE, "Sleep", wrappers_pb2.DoubleValue(value=delays[i]),
                                  empty_pb2.Empty)
                reply = await client.call(SERVICE, "Echo", wrappers_pb2.StringValue(value=str(i)),
                                          wrappers_pb2.StringValue)
                return reply.value

            start = time.monotonic()
            results = await asyncio.gather(*(one(i) for i in range(50)))
            elapsed = time.monotonic() - start
            assert results == [str(i) for i in range(50)]
            # Run one after another they would take sum(delays) (~8 s): they overlapped.
            assert elapsed < max(delays) + 1.5, elapsed
    run(go())


def test_client_timeout_raises_deadline_exceeded_and_the_connection_survives():
    async def go():
        async with serving() as path, client_of(path) as client:
            start = time.monotonic()
            await expect_error(ttrpc.Code.DEADLINE_EXCEEDED, client.call(
                SERVICE, "Sleep", wrappers_pb2.DoubleValue(value=30), empty_pb2.Empty,
                timeout=0.2))
            assert time.monotonic() - start < 2
            reply = await client.call(SERVICE, "Echo", wrappers_pb2.StringValue(value="ok"),
                                      wrappers_pb2.StringValue, timeout=5)
            assert reply.value == "ok"
    run(go())


def test_server_enforces_timeout_nano_as_the_handler_deadline():
    async def go():
        async with serving() as path:
            reader, writer = await asyncio.open_unix_connection(path)
            payload = wrappers_pb2.DoubleValue(value=30).SerializeToString()
            writer.write(request_frame(1, "Sleep", payload, timeout_nano=200_000_000))
            writer.write(request_frame(3, "Remaining", timeout_nano=5_000_000_000))
            # Remaining answers first, Sleep is cut at its deadline: responses by stream id.
            replies = [await read_response(reader), await read_response(reader)]
            by_stream = {frame.stream_id: resp for frame, resp in replies}
            assert by_stream[1].status.code == ttrpc.Code.DEADLINE_EXCEEDED
            assert "Sleep" in by_stream[1].status.message
            left = wrappers_pb2.DoubleValue.FromString(by_stream[3].payload).value
            assert 4.0 < left <= 5.0
            writer.close()
    run(go())


def test_metadata_reaches_the_handler():
    async def go():
        async with serving() as path, client_of(path) as client:
            reply = await client.call(
                SERVICE, "Metadata", empty_pb2.Empty(), wrappers_pb2.StringValue,
                metadata={"containerd-namespace": "k8s.io", "multi": ["a", "b"]})
            assert reply.value == repr([("containerd-namespace", ["k8s.io"]),
                                        ("multi", ["a", "b"])])
    run(go())


def test_wire_level_unary_exchange():
    """A request written byte by byte as another implementation would; reply parsed raw."""
    async def go():
        async with serving() as path:
            payload = wrappers_pb2.StringValue(value="hi").SerializeToString()
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(request_frame(7, "Echo", payload))
            frame, response = await read_response(reader)
            assert (frame.stream_id, frame.flags) == (7, 0)
            assert response.status.code == 0
            assert wrappers_pb2.StringValue.FromString(response.payload).value == "hi"
            # A payload that is not the method's request type: INVALID_ARGUMENT, not a crash.
            writer.write(request_frame(9, "Echo", b"\xff\xff"))
            frame, response = await read_response(reader)
            assert response.status.code == ttrpc.Code.INVALID_ARGUMENT
            assert "google.protobuf.StringValue" in response.status.message
            # A reused stream id is refused on that stream; the connection stays up.
            writer.write(request_frame(9, "Echo", payload))
            frame, response = await read_response(reader)
            assert (frame.stream_id, response.status.code) == (9, ttrpc.Code.INVALID_ARGUMENT)
            writer.close()
    run(go())
