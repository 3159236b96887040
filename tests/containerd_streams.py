"""A containerd stand-in for the Streaming service (`io_type = "streaming"`), as containerd 2.4's
CRI speaks it (internal/cri/io/streaming.go with core/streaming/proxy and core/transfer/streaming):
its own ttrpc connection per stream, a Stream call whose first message is StreamInit{id}, one
answer awaited as the ack; then output read granting 64 KiB windows (ReadByteStream) and input
written within the windows the server grants (WriteByteStream), CloseSend being stdin's EOF.
Used against the agent (tests/agent) and against the daemon's task address (tests/unit)."""
import asyncio

from google.protobuf import any_pb2

from vmm_common import ttrpc
from vmm_common.protos.containerd.services.streaming.v1 import streaming_pb2
from vmm_common.protos.containerd.types.transfer import streaming_pb2 as transfer

STREAMING = "containerd.services.streaming.v1.Streaming"
MAX_READ = 32 * 1024  # containerd's maxRead
WINDOW = 2 * MAX_READ  # containerd's windowSize


def pack(message) -> any_pb2.Any:
    return any_pb2.Any(type_url=message.DESCRIPTOR.full_name, value=message.SerializeToString())


def unpack(packed: any_pb2.Any, message_type):
    assert packed.type_url.rsplit("/", 1)[-1] == message_type.DESCRIPTOR.full_name, packed.type_url
    return message_type.FromString(packed.value)


class ContainerdStream:
    """One stream, opened and spoken as containerd does."""

    def __init__(self, client: ttrpc.Client, stream):
        self._client = client
        self._stream = stream
        self._window = 0  # granted to the agent and not used yet

    @classmethod
    async def open(cls, socket_path, stream_id: str) -> "ContainerdStream":
        return await cls.over(await ttrpc.Client.connect_unix(str(socket_path)), stream_id)

    @classmethod
    async def over(cls, client: ttrpc.Client, stream_id: str) -> "ContainerdStream":
        """On `client`, a connection of its own (containerd dials one per stream)."""
        stream = await client.stream(STREAMING, "Stream", any_pb2.Any, streaming_client=True,
                                     streaming_server=True)
        await stream.send(pack(streaming_pb2.StreamInit(id=stream_id)))
        ack = await asyncio.wait_for(stream.recv(), 10)  # proxy.streamCreator.Create waits for it
        assert ack is not None, "the stream ended instead of acknowledging StreamInit"
        return cls(client, stream)

    async def read_all(self, until: bytes | None = None) -> bytes:
        """ReadByteStream until the end of the stream (or what was read ends with `until`); no
        Data may exceed the granted window."""
        chunks = []
        while True:
            if self._window < WINDOW:
                await self._stream.send(pack(transfer.WindowUpdate(update=WINDOW)))
                self._window += WINDOW
            message = await self._stream.recv()
            if message is None:
                return b"".join(chunks)
            data = unpack(message, transfer.Data).data
            assert len(data) <= self._window, f"{len(data)} bytes sent, window {self._window}"
            self._window -= len(data)
            chunks.append(data)
            if until is not None and b"".join(chunks).endswith(until):
                return b"".join(chunks)

    async def write_all(self, data: bytes) -> None:
        """WriteByteStream: Data of at most 32 KiB, never more than the agent granted."""
        granted = asyncio.Event()
        remaining = 0

        async def read_grants():
            nonlocal remaining
            while (message := await self._stream.recv()) is not None:
                remaining += unpack(message, transfer.WindowUpdate).update
                granted.set()

        grants = asyncio.ensure_future(read_grants())
        try:
            view = memoryview(data)
            while view:
                if remaining == 0:
                    granted.clear()
                    await asyncio.wait_for(granted.wait(), 10)
                size = min(MAX_READ, remaining, len(view))
                await self._stream.send(pack(transfer.Data(data=bytes(view[:size]))))
                remaining -= size
                view = view[size:]
        finally:
            grants.cancel()

    async def close(self) -> None:
        """ioStream.Close: CloseSend, then the connection."""
        await self._stream.close_send()
        await self._client.close()

    async def drop(self) -> None:
        """The connection closes without CloseSend: containerd was killed."""
        await self._client.close()
