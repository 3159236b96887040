"""ttrpc framing against bytes computed by hand from containerd/ttrpc PROTOCOL.md."""
import asyncio

import pytest

from vmm_common.ttrpc import frame as fr
from vmm_common.ttrpc.errors import ProtocolError
from vmm_common.protos.ttrpc.request_pb2 import Request


def test_request_frame_bytes():
    # length 3, stream 1, type Request (0x01), no flags, then the data.
    assert fr.encode(1, fr.REQUEST, 0, b"abc") == (
        b"\x00\x00\x00\x03" b"\x00\x00\x00\x01" b"\x01" b"\x00" b"abc"
    )


def test_data_close_frame_bytes():
    # A client's close-send: Data (0x03) with remote-closed|no-data (0x01|0x04), no data.
    assert fr.encode(3, fr.DATA, fr.FLAG_REMOTE_CLOSED | fr.FLAG_NO_DATA) == (
        b"\x00\x00\x00\x00" b"\x00\x00\x00\x03" b"\x03" b"\x05"
    )


def test_request_envelope_bytes():
    # Request{service="s" (field 1), method="m" (field 2)} in protobuf: 0a 01 73 12 01 6d.
    data = Request(service="s", method="m").SerializeToString()
    assert data == b"\x0a\x01s\x12\x01m"
    assert fr.encode(0x01020305, fr.REQUEST, fr.FLAG_REMOTE_OPEN, data) == (
        b"\x00\x00\x00\x06" b"\x01\x02\x03\x05" b"\x01" b"\x02" + data
    )


def test_header_limits():
    assert fr.decode_header(b"\x00\x40\x00\x00" b"\x00\x00\x00\x01\x03\x00") == (
        fr.MAX_DATA_SIZE, 1, fr.DATA, 0
    )
    with pytest.raises(ProtocolError, match="exceeds"):
        fr.decode_header(b"\x00\x40\x00\x01" b"\x00\x00\x00\x01\x03\x00")
    with pytest.raises(ProtocolError, match="exceeds"):  # reserved first byte set
        fr.decode_header(b"\xff\xff\xff\xff" b"\x00\x00\x00\x01\x01\x00")
    with pytest.raises(ProtocolError, match="unknown message type"):
        fr.decode_header(b"\x00\x00\x00\x00" b"\x00\x00\x00\x01\x04\x00")
    with pytest.raises(ProtocolError, match="stream id 0"):
        fr.decode_header(b"\x00\x00\x00\x00" b"\x00\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError):
        fr.encode(1, fr.DATA, 0, bytes(fr.MAX_DATA_SIZE + 1))


def read_all(raw: bytes) -> list:
    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        frames = []
        while (frame := await fr.read_frame(reader)) is not None:
            frames.append(frame)
        return frames
    return asyncio.run(go())


def test_read_frames_then_clean_eof():
    raw = fr.encode(1, fr.REQUEST, 0, b"x") + fr.encode(1, fr.DATA, fr.FLAG_REMOTE_CLOSED)
    assert read_all(raw) == [
        fr.Frame(1, fr.REQUEST, 0, b"x"), fr.Frame(1, fr.DATA, fr.FLAG_REMOTE_CLOSED, b""),
    ]


def test_truncated_frames_are_protocol_errors():
    whole = fr.encode(5, fr.RESPONSE, 0, b"payload")
    with pytest.raises(ProtocolError, match="inside a frame header"):
        read_all(whole[:4])
    with pytest.raises(ProtocolError, match="3 of 7 data bytes"):
        read_all(whole[:13])
