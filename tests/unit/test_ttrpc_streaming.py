"""Streaming ttrpc calls: server-, client- and bidi-streaming, errors, and their frames."""
import asyncio
import socket

from google.protobuf import wrappers_pb2

from test_ttrpc_calls import SERVICE, client_of, expect_error, request_frame, run, serving
from vmm_common import ttrpc
from vmm_common.protos.ttrpc.request_pb2 import Response
from vmm_common.ttrpc import frame as fr


def test_server_streaming():
    async def go():
        async with serving() as path, client_of(path) as client:
            stream = await client.stream(SERVICE, "Count", wrappers_pb2.StringValue,
                                         wrappers_pb2.Int32Value(value=5),
                                         streaming_client=False, streaming_server=True)
            assert [m.value async for m in stream] == ["0", "1", "2", "3", "4"]
            assert await stream.recv() is None
    run(go())


def test_server_streaming_error_after_some_messages():
    async def go():
        async with serving() as path, client_of(path) as client:
            stream = await client.stream(SERVICE, "Count", wrappers_pb2.StringValue,
                                         wrappers_pb2.Int32Value(value=2),
                                         streaming_client=False, streaming_server=True,
                                         metadata={"fail-after": "yes"})
            assert (await stream.recv()).value == "0"
            assert (await stream.recv()).value == "1"
            message = await expect_error(ttrpc.Code.ABORTED, stream.recv())
            assert message == "stopped on purpose"
    run(go())


def test_client_streaming():
    async def go():
        async with serving() as path, client_of(path) as client:
            stream = await client.stream(SERVICE, "Total", wrappers_pb2.Int64Value,
                                         streaming_client=True, streaming_server=False)
            for i in range(1, 11):
                await stream.send(wrappers_pb2.Int64Value(value=i))
            assert (await stream.close_and_recv()).value == 55
    run(go())


def test_bidi_streaming_interleaved_with_unary_calls():
    async def go():
        async with serving() as path, client_of(path) as client:
            stream = await client.stream(SERVICE, "Shout", wrappers_pb2.StringValue,
                                         wrappers_pb2.StringValue(value="first"),
                                         streaming_client=True, streaming_server=True)
            assert (await stream.recv()).value == "FIRST"
            for word in ("a", "b", "c"):
                await stream.send(wrappers_pb2.StringValue(value=word))
                echoed = await client.call(SERVICE, "Echo", wrappers_pb2.StringValue(value=word),
                                           wrappers_pb2.StringValue)
                assert (await stream.recv()).value == echoed.value.upper()
            await stream.close_send()
            assert await stream.recv() is None
            await expect_error(ttrpc.Code.FAILED_PRECONDITION,
                               stream.send(wrappers_pb2.StringValue(value="late")))
    run(go())


def test_streaming_frames_on_the_wire():
    """Request[remote-open], Data, Data[remote-closed|no-data] in; Data, Response out."""
    async def go():
        async with serving() as path:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(request_frame(1, "Total", flags=fr.FLAG_REMOTE_OPEN))
            for value in (4, 5):
                writer.write(fr.encode(1, fr.DATA, 0,
                                       wrappers_pb2.Int64Value(value=value).SerializeToString()))
            writer.write(fr.encode(1, fr.DATA, fr.FLAG_REMOTE_CLOSED | fr.FLAG_NO_DATA))
            frame = await fr.read_frame(reader)
            assert (frame.stream_id, frame.type, frame.flags) == (1, fr.RESPONSE, 0)
            response = Response.FromString(frame.data)
            assert wrappers_pb2.Int64Value.FromString(response.payload).value == 9

            count = wrappers_pb2.Int32Value(value=2).SerializeToString()
            writer.write(request_frame(3, "Count", count, flags=fr.FLAG_REMOTE_CLOSED))
            frames = [await fr.read_frame(reader) for _ in range(3)]
            assert [(f.stream_id, f.type, f.flags) for f in frames] == [
                (3, fr.DATA, 0), (3, fr.DATA, 0),
                (3, fr.DATA, fr.FLAG_REMOTE_CLOSED | fr.FLAG_NO_DATA),
            ]
            writer.close()
    run(go())


def test_a_handler_that_does_not_read_its_stream_is_stopped():
    """64 messages queue up; beyond that the call ends RESOURCE_EXHAUSTED, not memory."""
    async def go():
        async with serving() as path, client_of(path) as client:
            stream = await client.stream(SERVICE, "Ignore", wrappers_pb2.StringValue,
                                         streaming_client=True, streaming_server=False)
            message = wrappers_pb2.StringValue(value="z" * 1000)
            for _ in range(70):
                await stream.send(message)
            await expect_error(ttrpc.Code.RESOURCE_EXHAUSTED, stream.recv())
            reply = await client.call(SERVICE, "Echo", message, wrappers_pb2.StringValue)
            assert reply == message
    run(go())


def test_what_a_client_sent_before_closing_survives_a_reply_that_fails():
    """containerd ends a stream with its last messages, CloseSend and a close of the connection,
    while the server may still be answering: that answer fails (EPIPE) before the server read
    the last frames, and asyncio would then drop them. The server reads them to the end."""
    received, client_closed, consuming = [], asyncio.Event(), []

    async def consume(stream):
        try:
            received.extend([m.value async for m in stream] + ["clean end"])
        except ttrpc.RpcError as e:
            received.append(e.code)

    async def collect(stream, ctx):
        received.append((await stream.recv()).value)
        await stream.send(wrappers_pb2.StringValue(value="ready"))
        await client_closed.wait()  # runs before the loop polls the socket again
        try:
            await stream.send(wrappers_pb2.StringValue(value="too late"))
        except OSError:
            pass
        consuming.append(asyncio.ensure_future(consume(stream)))
        await asyncio.shield(consuming[0])  # the call lasts while its stream is read

    async def go():
        server = ttrpc.Server()
        server.register(SERVICE, {"Collect": ttrpc.bidi_stream(wrappers_pb2.StringValue,
                                                              collect)})
        async with serving(server) as path:
            loop = asyncio.get_running_loop()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            await loop.sock_connect(sock, path)
            first = wrappers_pb2.StringValue(value="first").SerializeToString()
            await loop.sock_sendall(sock, request_frame(1, "Collect", first, fr.FLAG_REMOTE_OPEN))
            assert await loop.sock_recv(sock, 1 << 16)  # "ready"
            for word in ("second", "third"):  # then, without yielding to the server:
                sock.send(fr.encode(1, fr.DATA, 0, wrappers_pb2.StringValue(
                    value=word).SerializeToString()))
            sock.send(fr.encode(1, fr.DATA, fr.FLAG_REMOTE_CLOSED | fr.FLAG_NO_DATA))
            sock.close()
            client_closed.set()
            while not consuming:
                await asyncio.sleep(0.01)
            await asyncio.wait_for(consuming[0], 5)
    run(go())
    assert received == ["first", "second", "third", "clean end"]
