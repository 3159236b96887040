"""ttrpc message framing (containerd/ttrpc PROTOCOL.md).

Every frame is a 10-byte big-endian header — data length (u32), stream id (u32),
message type (u8), flags (u8) — followed by `length` bytes of data (at most 4 MiB).
"""
import asyncio
import struct
from collections import namedtuple

from .errors import ProtocolError

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10
MAX_DATA_SIZE = 4 << 20

# Message types.
REQUEST = 0x01
RESPONSE = 0x02
DATA = 0x03
MESSAGE_TYPES = (REQUEST, RESPONSE, DATA)

# Flags: on Request, REMOTE_CLOSED/REMOTE_OPEN mark a streaming call (no flags = unary);
# on Data, REMOTE_CLOSED ends the sender's side and NO_DATA marks a frame with no message.
FLAG_REMOTE_CLOSED = 0x01
FLAG_REMOTE_OPEN = 0x02
FLAG_NO_DATA = 0x04


# collections' namedtuple, not typing's: the guest agent does not import typing before ready
Frame = namedtuple("Frame", "stream_id type flags data")


def encode(stream_id: int, msg_type: int, flags: int, data: bytes = b"") -> bytes:
    """One frame as bytes; refuses what the peer would have to reject."""
    if len(data) > MAX_DATA_SIZE:
        raise ValueError(f"frame data of {len(data)} bytes exceeds {MAX_DATA_SIZE}")
    return HEADER.pack(len(data), stream_id, msg_type, flags) + data


def decode_header(header: bytes) -> tuple[int, int, int, int]:
    """(length, stream_id, type, flags), validated before anything is read or allocated."""
    length, stream_id, msg_type, flags = HEADER.unpack(header)
    if length > MAX_DATA_SIZE:
        raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_DATA_SIZE}-byte limit")
    if msg_type not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {msg_type:#04x} on stream {stream_id}")
    if stream_id == 0:
        raise ProtocolError("stream id 0 is not valid")
    return length, stream_id, msg_type, flags


async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """The next frame, or None on a clean end of stream between frames."""
    try:
        header = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise ProtocolError(f"connection closed inside a frame header ({len(e.partial)} bytes)")
    length, stream_id, msg_type, flags = decode_header(header)
    try:
        data = await reader.readexactly(length) if length else b""
    except asyncio.IncompleteReadError as e:
        raise ProtocolError(f"connection closed after {len(e.partial)} of {length} data bytes")
    return Frame(stream_id, msg_type, flags, data)
