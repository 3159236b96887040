"""A ttrpc connection's byte stream as frames: the one place that reads and writes it."""
import asyncio

from . import frame as fr
from .errors import RpcError, Code

CLOSE_GRACE_S = 1.0


class Channel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    async def recv(self) -> fr.Frame | None:
        """Next frame; None at a clean EOF; ProtocolError on a broken peer."""
        return await fr.read_frame(self.reader)

    async def send(self, stream_id: int, msg_type: int, flags: int, data: bytes = b"") -> None:
        """Write one whole frame (a single write, so concurrent senders never interleave)."""
        if len(data) > fr.MAX_DATA_SIZE:
            raise RpcError(Code.RESOURCE_EXHAUSTED,
                           f"message of {len(data)} bytes exceeds the {fr.MAX_DATA_SIZE}-byte limit")
        if self.writer.is_closing():
            raise ConnectionResetError("ttrpc connection is closed")
        self.writer.write(fr.encode(stream_id, msg_type, flags, data))
        await self.writer.drain()

    async def close(self) -> None:
        """Close; a peer that stopped reading cannot hold us here (abort after a grace)."""
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), CLOSE_GRACE_S)
        except (OSError, asyncio.TimeoutError):
            self.writer.transport.abort()
