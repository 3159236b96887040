"""Frames on the relay's two kinds of connection, parsed without asyncio or protobuf.

containerd's connections carry ttrpc frames (containerd/ttrpc PROTOCOL.md, as
vmm_common/ttrpc/frame.py reads them in the daemon; not imported here: that package loads
asyncio and protobuf, which the relay process does without). The relay's control connection to
the daemon uses the same 10-byte header shape: payload length (u32), connection id (u32),
message kind (u8), flags (u8: RESUMED, else 0); the payload of SEND/RECEIVED is one whole
ttrpc frame.
"""
import struct

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10
TTRPC_MAX_DATA = 4 << 20   # ttrpc's message limit
TTRPC_REQUEST, TTRPC_RESPONSE, TTRPC_DATA = 1, 2, 3
TTRPC_FLAG_REMOTE_CLOSED = 0x01
INVALID_ARGUMENT, RESOURCE_EXHAUSTED = 3, 8  # google.rpc codes of the relay's own answers

# Control messages, daemon -> relay.
LISTEN = 1      # payload: pod id; one fd rides along (SCM_RIGHTS): the pod's listening task.sock
UNLISTEN = 2    # payload: pod id: close its listener and every connection made through it
SEND = 3        # to connection `conn`: one ttrpc frame (a response or data)
CLOSE = 4       # close connection `conn`
# Control messages, relay -> daemon.
LISTENING = 5   # payload: pod id: a listener the relay holds (the state sent to a new daemon)
OPEN = 6        # connection `conn` was accepted on pod (payload)'s listener
RECEIVED = 7    # from connection `conn`: one ttrpc frame (a request or data)
CLOSED = 8      # connection `conn` is gone (containerd closed it, or it broke the protocol)
SYNCED = 9      # the state and every unanswered request have been sent: live from here on
# Flag of a replayed RECEIVED request: a stream an earlier daemon had begun to answer (it sent
# frames on it, e.g. a Streaming call's ack): the new daemon goes on with it, it does not begin it.
RESUMED = 0x01
CONTROL_KINDS = range(LISTEN, SYNCED + 1)
MAX_CONTROL_PAYLOAD = HEADER_SIZE + TTRPC_MAX_DATA


class WireError(Exception):
    """A peer broke the framing: its connection is closed."""


def message(kind: int, conn: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """A control message's header (send the payload after it)."""
    return HEADER.pack(len(payload), conn, kind, flags)


def take(buffer: bytearray, max_payload: int):
    """Yield (id, kind, flags, whole frame bytes) for every complete frame at the head of
    `buffer` and remove them; a header announcing more than `max_payload` is WireError before
    anything of it is kept. A frame's validity beyond its size is the caller's to judge."""
    start = 0
    while len(buffer) - start >= HEADER_SIZE:
        length, ident, kind, flags = HEADER.unpack_from(buffer, start)
        if length > max_payload:
            raise WireError(f"frame of {length} bytes exceeds the {max_payload}-byte limit")
        end = start + HEADER_SIZE + length
        if len(buffer) < end:
            break
        yield ident, kind, flags, bytes(buffer[start:end])
        start = end
    del buffer[:start]


def ttrpc_header(frame: bytes) -> tuple[int, int, int]:
    """(stream id, type, flags) of a whole ttrpc frame."""
    _, stream_id, msg_type, flags = HEADER.unpack_from(frame)
    return stream_id, msg_type, flags


def ends_stream(msg_type: int, flags: int) -> bool:
    """Whether a server's frame finishes its call: the response, or a stream's last data."""
    return msg_type == TTRPC_RESPONSE or (msg_type == TTRPC_DATA and flags & TTRPC_FLAG_REMOTE_CLOSED)


def error_response(stream_id: int, code: int, text: str) -> bytes:
    """A ttrpc Response frame with status `code` and `text` (the relay's own answer when it
    cannot keep a request): Response{status(1): google.rpc.Status{code(1), message(2)}}."""
    message = text.encode()[:1024].decode(errors="ignore").encode()  # at most 1 KiB, whole characters
    status = _field(1, _varint(code)) + _field(2, message, length=True)
    body = _field(1, status, length=True)
    return HEADER.pack(len(body), stream_id, TTRPC_RESPONSE, 0) + body


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, value: bytes, length: bool = False) -> bytes:
    """A protobuf field: varint (wire type 0) or length-delimited (wire type 2)."""
    if length:
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    return _varint(number << 3) + value
