"""vhost-user wire codec: message header, payload layouts and SCM_RIGHTS file descriptors.

Only framing lives here (QEMU's docs/interop/vhost-user.rst); what the messages mean is the
backend's business (`backend.py`). Every length read from the socket is checked before use.
"""

import array
import os
import socket
import struct
from collections import namedtuple

# Requests (front-end -> back-end) this backend knows.
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_LOG_BASE = 6
SET_LOG_FD = 7
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
GET_CONFIG = 24
SET_CONFIG = 25

FLAG_VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
REPLY_FLAGS = FLAG_VERSION | FLAG_REPLY  # QEMU 7.2 accepts exactly 0x5

# Feature bits (GET_FEATURES) and protocol feature bits (GET_PROTOCOL_FEATURES).
F_PROTOCOL_FEATURES = 1 << 30
PROTOCOL_F_MQ = 1 << 0
PROTOCOL_F_REPLY_ACK = 1 << 3
PROTOCOL_F_CONFIG = 1 << 9

# SET_VRING_KICK/CALL/ERR payload: low byte is the queue index; bit 8 says "no fd attached".
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")           # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")         # index, flags, desc, used, avail, log (QEMU uvas)
MEM_TABLE_HEADER = struct.Struct("<II")       # nregions, padding
MEM_REGION = struct.Struct("<QQQQ")           # guest_phys_addr, memory_size, userspace_addr, mmap_offset
CONFIG_HEADER = struct.Struct("<III")         # offset, size, flags

MAX_PAYLOAD = 4096   # the largest message we accept (SET_MEM_TABLE with 8 regions is 264 bytes)
MAX_REGIONS = 8
MAX_FDS = 8


class ProtocolError(Exception):
    """The front-end sent something that is not vhost-user: the session must end."""


class Message:
    # A plain class, not a dataclass: the backend process (serve.py) would import dataclasses
    # and with it inspect/ast/dis (~1 MB) for this and MemoryRegionEntry alone.
    __slots__ = ("request", "flags", "payload", "fds")

    def __init__(self, request: int, flags: int, payload: bytes, fds: list | None = None):
        self.request, self.flags, self.payload = request, flags, payload
        self.fds = fds if fds is not None else []

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def unpack(self, layout: struct.Struct) -> tuple:
        """The payload as `layout`; a payload of the wrong size is a protocol error."""
        if len(self.payload) < layout.size:
            raise ProtocolError(f"request {self.request}: payload {len(self.payload)} bytes, "
                                f"expected {layout.size}")
        return layout.unpack_from(self.payload)


MemoryRegionEntry = namedtuple("MemoryRegionEntry", "guest_phys_addr memory_size userspace_addr mmap_offset")


def encode(request: int, payload: bytes = b"", flags: int = FLAG_VERSION) -> bytes:
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes) -> bytes:
    return encode(request, payload, REPLY_FLAGS)


def encode_mem_table(regions: list) -> bytes:
    body = MEM_TABLE_HEADER.pack(len(regions), 0)
    for r in regions:
        body += MEM_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
    return body


def decode_mem_table(payload: bytes) -> list:
    if len(payload) < MEM_TABLE_HEADER.size:
        raise ProtocolError("SET_MEM_TABLE: short payload")
    count, _ = MEM_TABLE_HEADER.unpack_from(payload)
    if count > MAX_REGIONS or len(payload) < MEM_TABLE_HEADER.size + count * MEM_REGION.size:
        raise ProtocolError(f"SET_MEM_TABLE: {count} regions in {len(payload)} bytes")
    return [MemoryRegionEntry(*MEM_REGION.unpack_from(payload, MEM_TABLE_HEADER.size + i * MEM_REGION.size))
            for i in range(count)]


class MessageReader:
    """Reassembles messages from stream chunks and gives each its SCM_RIGHTS fds.

    A unix stream recvmsg may glue fd-less messages in front of one that carries fds, but it
    always stops right after the bytes the fds came with: so fds belong to the message that
    holds the chunk's last byte.
    """

    def __init__(self):
        self._buf = bytearray()
        self._base = 0          # stream offset of _buf[0]
        self._fds = []          # [(stream offset of the bytes they came with, fd)]

    def feed(self, data: bytes, fds: list = ()) -> list:
        """Adds a chunk; returns the messages it completed. Raises ProtocolError on garbage."""
        last = self._base + len(self._buf) + len(data) - 1
        self._fds.extend((last, fd) for fd in fds)
        self._buf += data
        out = []
        while len(self._buf) >= HEADER.size:
            request, flags, size = HEADER.unpack_from(self._buf)
            if flags & 0x3 != FLAG_VERSION:
                raise ProtocolError(f"bad version flags {flags:#x} (request {request})")
            if size > MAX_PAYLOAD:
                raise ProtocolError(f"request {request}: payload of {size} bytes refused")
            end = HEADER.size + size
            if len(self._buf) < end:
                break
            stop = self._base + end
            mine = [fd for off, fd in self._fds if off < stop]
            self._fds = [(off, fd) for off, fd in self._fds if off >= stop]
            out.append(Message(request, flags, bytes(self._buf[HEADER.size:end]), mine))
            del self._buf[:end]
            self._base = stop
        return out

    def close(self):
        """Closes fds received but not yet claimed by a message."""
        close_fds(fd for _, fd in self._fds)
        self._fds = []


def recv_chunk(sock: socket.socket) -> tuple:
    """One recvmsg: (data, fds). Truncated ancillary data (lost fds) is a protocol error."""
    data, ancdata, msg_flags, _ = sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
    fds = []
    for level, kind, blob in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(blob[: len(blob) - len(blob) % arr.itemsize])
            fds.extend(arr)
    if msg_flags & socket.MSG_CTRUNC:
        close_fds(fds)
        raise ProtocolError("file descriptors were truncated")
    return data, fds


def send_message(sock: socket.socket, data: bytes, fds: list = ()) -> None:
    """Sends one whole message (used by test front-ends, and for replies)."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])


def close_fds(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
