"""A broken or hostile peer ends only its own connection, on either side.

The server must log, drop that connection and keep serving; the client (which talks to
an untrusted guest) must fail its pending calls and never hang or crash.
"""
import asyncio
import contextlib
import logging
import os
import random
import struct
import tempfile

import pytest
from google.protobuf import empty_pb2, wrappers_pb2

from test_ttrpc_calls import (
    SERVICE, client_of, expect_error, raw_exchange, read_response, request_frame, run, serving,
)
from vmm_common import ttrpc
from vmm_common.protos.google.rpc.status_pb2 import Status
from vmm_common.protos.ttrpc.request_pb2 import Response
from vmm_common.ttrpc import connection
from vmm_common.ttrpc import frame as fr


async def still_answers(path):
    async with client_of(path) as client:
        reply = await client.call(SERVICE, "Echo", wrappers_pb2.StringValue(value="alive"),
                                  wrappers_pb2.StringValue, timeout=5)
        assert reply.value == "alive"


BROKEN = {
    "oversized": struct.pack(">IIBB", fr.MAX_DATA_SIZE + 1, 1, fr.REQUEST, 0),
    "claims 4 GiB": b"\xff\xff\xff\xff\x00\x00\x00\x01\x01\x00" + b"tiny",
    "unknown type": fr.encode(1, 0x09, 0, b""),
    "even stream id": fr.encode(2, fr.REQUEST, 0, b""),
    "stream id 0": fr.encode(0, fr.REQUEST, 0, b""),
    "response to a server": fr.encode(1, fr.RESPONSE, 0, b""),
    "undecodable envelope": fr.encode(1, fr.REQUEST, 0, b"\x0a\xff\xff\xff"),
    "truncated": fr.encode(1, fr.REQUEST, 0, b"abcdef")[:12],
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_frames_close_only_that_connection(case, caplog):
    async def go():
        async with serving() as path:
            with caplog.at_level(logging.WARNING, logger="vmm_common.ttrpc"):
                answer = await raw_exchange(path, BROKEN[case])
            assert answer == b""  # closed, nothing allocated or answered
            assert "closing connection" in caplog.text
            await still_answers(path)
    run(go())


FUZZ_METHODS = ["Echo", "Sleep", "Fail", "Refuse", "Metadata", "Remaining", "ForgetToReturn",
                "Total", "Shout", "Nope"]
SENTINEL_SID = 1001


def test_fuzzed_frames_never_take_the_server_down():
    """5000 mutated or random frames in 100 connections, then a normal call.

    Each connection gets 45 frames with a sound header (requests and data with mutated
    payloads, flags, methods, deadlines; rarely a mutated envelope, which is fatal), then a sentinel
    Echo whose answer shows how far the server got, then 5 frames of anything (mutated
    headers, noise) that usually end the connection.
    """
    rng = random.Random(20261124)

    def mutated(data: bytes) -> bytes:
        data = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)

    def some_payload() -> bytes:
        return mutated(wrappers_pb2.StringValue(value="fuzz" * rng.randint(0, 8)).SerializeToString())

    def sound_frame(sid: int) -> bytes:
        kind = rng.random()
        flags = rng.choice([0, 0, fr.FLAG_REMOTE_CLOSED, fr.FLAG_REMOTE_OPEN, rng.randrange(256)])
        if kind < 0.65:
            return request_frame(sid, rng.choice(FUZZ_METHODS), some_payload(), flags=flags,
                                 timeout_nano=rng.choice([0, rng.randrange(-10**9, 10**10)]),
                                 metadata=[{"key": "k", "value": "v" * rng.randrange(9)}])
        if kind < 0.98:
            return fr.encode(sid, fr.DATA, flags, some_payload())
        return fr.encode(sid, fr.REQUEST, flags, mutated(request_frame(sid, "Echo")[10:]))

    def anything() -> bytes:
        if rng.random() < 0.5:
            return mutated(sound_frame(rng.randrange(1, 2000)))
        return rng.randbytes(rng.randint(1, 40))

    async def fuzz_connection(path) -> int:
        sids = sorted(rng.sample(range(1, SENTINEL_SID, 2), 45))
        body = b"".join(sound_frame(sid) for sid in sids)
        body += request_frame(SENTINEL_SID, "Echo", b"")
        tail = b"".join(anything() for _ in range(5))
        reader, writer = await asyncio.open_unix_connection(path)
        answered = 0
        try:
            writer.write(body)
            while (frame := await asyncio.wait_for(fr.read_frame(reader), 10)) is not None:
                answered += 1
                if frame.stream_id == SENTINEL_SID and frame.type == fr.RESPONSE:
                    writer.write(tail)
                    writer.write_eof()
        except ConnectionError:
            pass  # the server dropped us while we were still writing
        finally:
            writer.close()
        return answered

    loop_errors = []

    async def go():
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: loop_errors.append(ctx))
        async with serving() as path:
            answered = sum([await fuzz_connection(path) for _ in range(100)])
            await still_answers(path)
        return answered

    logging.getLogger("vmm_common.ttrpc").setLevel(logging.CRITICAL)  # 100s of expected lines
    try:
        answered = run(go(), timeout=120)
    finally:
        logging.getLogger("vmm_common.ttrpc").setLevel(logging.NOTSET)
    assert loop_errors == []
    assert answered > 1000, f"only {answered} frames answered: the fuzz stayed shallow"


def test_calls_in_flight_per_connection_are_bounded():
    async def go():
        async with serving() as path:
            reader, writer = await asyncio.open_unix_connection(path)
            long_sleep = wrappers_pb2.DoubleValue(value=30).SerializeToString()
            limit = connection.MAX_IN_FLIGHT
            writer.write(b"".join(request_frame(2 * i + 1, "Sleep", long_sleep)
                                  for i in range(limit + 3)))
            refused = [await read_response(reader) for _ in range(3)]
            assert [f.stream_id for f, _ in refused] == [2 * i + 1 for i in range(limit, limit + 3)]
            assert {r.status.code for _, r in refused} == {ttrpc.Code.RESOURCE_EXHAUSTED}
            writer.close()
            await still_answers(path)
    run(go())


@contextlib.asynccontextmanager
async def scripted_server(script):
    """A fake ttrpc server on a unix socket: `script(reader, writer)` plays the server."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "evil.sock")
        server = await asyncio.start_unix_server(script, path)
        async with server:
            yield path


async def answer(writer, sid, status=0, payload=b"", message=""):
    response = Response(status=Status(code=status, message=message), payload=payload)
    writer.write(fr.encode(sid, fr.RESPONSE, 0, response.SerializeToString()))
    await writer.drain()


def test_client_stream_ids_are_odd_and_increasing_and_stray_replies_ignored():
    seen = []

    async def script(reader, writer):
        while (frame := await fr.read_frame(reader)) is not None:
            seen.append(frame.stream_id)
            await answer(writer, frame.stream_id + 100, status=13)  # for nobody: ignored
            await answer(writer, frame.stream_id)

    async def go():
        async with scripted_server(script) as path, client_of(path) as client:
            for _ in range(3):
                await client.call("s", "m", empty_pb2.Empty(), empty_pb2.Empty, timeout=5)
    run(go())
    assert seen == [1, 3, 5]


HOSTILE_REPLIES = {
    "oversized": struct.pack(">IIBB", fr.MAX_DATA_SIZE + 1, 1, fr.RESPONSE, 0),
    "undecodable envelope": fr.encode(1, fr.RESPONSE, 0, b"\x0a\xff\xff"),
    "data on a unary stream": fr.encode(1, fr.DATA, 0, b""),
    "server-initiated stream": fr.encode(2, fr.REQUEST, 0, b""),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_REPLIES))
def test_hostile_server_fails_pending_calls_as_unavailable(case):
    async def script(reader, writer):
        await fr.read_frame(reader)
        writer.write(HOSTILE_REPLIES[case])
        await writer.drain()
        await reader.read()  # hold the connection open: the client must hang up itself

    async def go():
        async with scripted_server(script) as path, client_of(path) as client:
            message = await expect_error(ttrpc.Code.UNAVAILABLE, client.call(
                "s", "m", empty_pb2.Empty(), empty_pb2.Empty, timeout=5))
            assert "protocol error" in message
            await expect_error(ttrpc.Code.UNAVAILABLE, client.call(
                "s", "m", empty_pb2.Empty(), empty_pb2.Empty, timeout=5))
    run(go())


def test_server_hanging_up_fails_pending_calls():
    async def script(reader, writer):
        await fr.read_frame(reader)
        writer.close()

    async def go():
        async with scripted_server(script) as path, client_of(path) as client:
            assert not client.closed
            message = await expect_error(ttrpc.Code.UNAVAILABLE, client.call(
                "s", "m", empty_pb2.Empty(), empty_pb2.Empty, timeout=5))
            assert "closed" in message
            assert client.closed  # the daemon reopens its agent link on this flag
    run(go())


def test_server_survives_a_client_that_never_reads():
    """Responses pile up unread on one connection; others are still served."""
    async def go():
        async with serving() as path:
            reader, writer = await asyncio.open_unix_connection(path)
            big = wrappers_pb2.StringValue(value="y" * (1 << 20)).SerializeToString()
            for i in range(16):
                writer.write(request_frame(2 * i + 1, "Echo", big))
            await writer.drain()
            await still_answers(path)
            writer.close()
    run(go())


def test_a_peers_huge_error_message_reaches_the_caller_capped():
    """What the host quotes from a guest's error (logs, gRPC errors to containerd) is bounded."""
    async def go():
        async with serving() as path, client_of(path) as client:
            message = await expect_error(ttrpc.Code.NOT_FOUND, client.call(
                SERVICE, "Refuse", wrappers_pb2.StringValue(value="x" * (1 << 20)), empty_pb2.Empty))
            assert message.startswith("container xxx") and len(message) < 1100
            assert message.endswith(f"… [{len('container  not found') + (1 << 20) - 1024} more "
                                    "characters cut]")
    run(go())
