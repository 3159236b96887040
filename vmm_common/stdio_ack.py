"""The acknowledged stdio stream (`vsock://PORT?ack`): what the daemon and the agent say to each
other so that a container's output survives a restart of the daemon (docs/stdio.md).

Output (guest → host), on every connection: the host first sends an OFFSET (the bytes of this
stream it has durably delivered so far), the guest sends the stream's raw bytes from that offset
on, the host sends cumulative OFFSETs back as acknowledgements, and the guest half-closes after
the last byte. Stdin (host → guest): FRAMEs of [length][bytes]; length 0 ends the process's stdin.
Both sides are stdlib only: the agent imports this in the guest.
"""

import struct

ACK_SUFFIX = "?ack"
OFFSET = struct.Struct(">Q")  # u64, big-endian
FRAME = struct.Struct(">I")   # u32 payload length, big-endian
WINDOW = 2 << 20              # unacknowledged output the agent retains per stream before it stops reading
ACK_EVERY = 256 << 10         # the host acknowledges at least this often (and at the end)
MAX_FRAME = 1 << 20           # the largest stdin frame; a longer header is a protocol error


class ProtocolError(Exception):
    """The peer broke the stream's protocol: that connection is closed, nothing else."""


def frame(data: bytes) -> bytes:
    return FRAME.pack(len(data)) + data
