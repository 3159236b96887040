"""Copy bytes both ways between two asyncio stream pairs, as a TCP proxy must: each side's EOF is
passed on as a half-close (the other direction goes on), and a failure on either side ends both
at once. Memory is bounded per connection: one CHUNK read at a time per direction, written and
drained before the next read, so a side that stops reading only stalls its own direction.
"""

import asyncio
import socket
import struct

CHUNK = 64 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def splice(a: tuple, b: tuple) -> None:
    """Relay between `a` and `b`, each a (reader, writer), until both directions ended; then
    close both. An error (reset, broken pipe) or a cancellation resets both instead (TCP
    sockets get an RST, so a peer sees the failure as one); errors are not raised."""
    pumps = [asyncio.ensure_future(_pump(a[0], b[1])), asyncio.ensure_future(_pump(b[0], a[1]))]
    try:
        await asyncio.gather(*pumps)
    except (OSError, RuntimeError):  # RuntimeError: write_eof on a transport already closing
        reset(a[1], b[1])
    except BaseException:
        reset(a[1], b[1])
        raise
    finally:
        for pump in pumps:
            pump.cancel()
        for writer in (a[1], b[1]):
            writer.close()


def reset(*writers: asyncio.StreamWriter) -> None:
    """Close each writer's connection at once; a TCP peer gets an RST, not an orderly EOF."""
    for writer in writers:
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass  # already closed
        writer.transport.abort()
