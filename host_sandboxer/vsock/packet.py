"""virtio-vsock packet header (virtio 1.2 §5.10.6): 44 bytes, little endian."""

import struct

HEADER = struct.Struct("<QQIIIHHIII")  # src_cid dst_cid src_port dst_port len type op flags buf_alloc fwd_cnt
HEADER_SIZE = HEADER.size  # 44

HOST_CID = 2
TYPE_STREAM = 1

OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7

SHUTDOWN_RCV = 1   # the sender will receive no more
SHUTDOWN_SEND = 2  # the sender will send no more
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND

MAX_PAYLOAD = 64 * 1024   # VIRTIO_VSOCK_MAX_PKT_BUF_SIZE: the most a guest sends in one packet

OP_NAMES = {OP_REQUEST: "REQUEST", OP_RESPONSE: "RESPONSE", OP_RST: "RST", OP_SHUTDOWN: "SHUTDOWN",
            OP_RW: "RW", OP_CREDIT_UPDATE: "CREDIT_UPDATE", OP_CREDIT_REQUEST: "CREDIT_REQUEST"}


def read_header(views: list) -> tuple:
    """Unpacks the header from the start of a chain's readable views (it may span several).
    Copies at most the header's 44 bytes, whatever the descriptors behind it claim."""
    first = views[0] if views else b""
    if len(first) >= HEADER_SIZE:
        return HEADER.unpack_from(first)
    head = bytearray()
    for v in views:
        head += v[:HEADER_SIZE - len(head)]
        if len(head) == HEADER_SIZE:
            return HEADER.unpack_from(head)
    raise ValueError(f"packet of {len(head)} bytes has no complete header")


def write_header(views: list, fields: tuple) -> None:
    """Packs the header into the start of a chain's writable views (it may span several)."""
    if len(views[0]) >= HEADER_SIZE:
        HEADER.pack_into(views[0], 0, *fields)
        return
    data = HEADER.pack(*fields)
    for v in views:
        n = min(len(v), len(data))
        v[:n] = data[:n]
        data = data[n:]
        if not data:
            return
    raise ValueError("buffer too small for a packet header")


def slice_views(views: list, skip: int, limit: int) -> list:
    """The sub-views covering bytes [skip, skip+limit) of the concatenation of `views`."""
    out = []
    for v in views:
        n = len(v)
        if skip >= n:
            skip -= n
            continue
        part = v[skip:skip + limit]
        skip = 0
        if part:
            out.append(part)
            limit -= len(part)
        if limit <= 0:
            break
    return out
