"""containerd.services.streaming.v1.Streaming: stdio streams containerd opens on the task address
when `io_type = "streaming"` (containerd's core/streaming/proxy and core/transfer/streaming).

One bidirectional Stream call per stdio stream, google.protobuf.Any both ways:
- containerd sends StreamInit{id} first; we answer with one message at once (an Empty: the ack its
  stream creator waits for) and hand the stream to the process whose stdio names that ID
  (vmm_task/container/streams.py), however long that takes;
- output (stdout/stderr): containerd grants bytes with WindowUpdate; we send Data no larger than
  the window allows and end the call at the process's EOF;
- input (stdin): we grant a window, containerd sends Data, and its CloseSend is stdin's EOF; the
  window is granted again only as bytes reach the process's stdin, so a process not reading
  stops containerd (nothing is buffered without bound);
- a connection lost without CloseSend (containerd restarted) leaves the process's side waiting
  for the next stream with the same ID, which CRI opens again.
"""

import asyncio
import contextlib
import logging
import socket

from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import DecodeError

from vmm_common.fdio import read_chunk, write_all
from vmm_common.protos.containerd.services.streaming.v1 import streaming_pb2
from vmm_common.protos.containerd.types.transfer import streaming_pb2 as transfer
from vmm_common.ttrpc.errors import RpcError
from vmm_task.container.errors import TaskError
from vmm_task.container.streams import STREAMS, StreamPeer

log = logging.getLogger(__name__)

SERVICE = "containerd.services.streaming.v1.Streaming"
MAX_DATA = 32 * 1024  # containerd's maxRead: the largest Data it sends
WINDOW = 2 * MAX_DATA  # containerd's windowSize: what one grant gives


def pack(message) -> any_pb2.Any:
    """containerd's typeurl names a proto type by its full name alone (no type.googleapis.com/)."""
    return any_pb2.Any(type_url=message.DESCRIPTOR.full_name, value=message.SerializeToString())


def unpack(packed: any_pb2.Any, message_type):
    """`packed` as `message_type`, or None when it holds another type or does not decode."""
    if packed.type_url.rsplit("/", 1)[-1] != message_type.DESCRIPTOR.full_name:
        return None
    try:
        return message_type.FromString(packed.value)
    except DecodeError:
        return None


class TtrpcStreamPeer(StreamPeer):
    """One Stream call, pumped to or from the socket the process's stdio hands it. When the
    connection is lost without containerd ending the stream (containerd restarted), the socket
    waits for the next stream with the same ID (CRI opens it again) and goes on there; what was
    read but not sent goes first. `finished` resolves when the last of them is done."""

    def __init__(self, stream, stream_id: str):
        self._stream = stream
        self._id = stream_id
        self._lost = False  # the connection ended without containerd's CloseSend
        self._task: asyncio.Task | None = None
        self.finished = asyncio.get_running_loop().create_future()

    def attach(self, sock: socket.socket, output: bool, pending: bytes = b"") -> None:
        self._task = asyncio.ensure_future(self._pump(sock, output, pending))
        self._task.add_done_callback(self._done)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        elif not self.finished.done():
            self.finished.set_result(None)

    def _done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.warning("stream %s: %s", self._id, task.exception())
        if not self.finished.done():
            self.finished.set_result(None)

    async def _pump(self, sock: socket.socket, output: bool, pending: bytes) -> None:
        try:
            if output:
                pending = await self._send_output(sock, pending)
                resume = pending is not None
            else:
                resume = await self._receive_input(sock)
            if not resume:
                return
            log.info("stream %s: connection lost, waiting for containerd to open it again",
                     self._id)
            STREAMS.forget(self._id, self)
            successor = await STREAMS.take(self._id)
            successor.attach(sock, output, pending or b"")
            sock = None  # the successor's now
            try:
                await asyncio.shield(successor.finished)
            except asyncio.CancelledError:
                successor.stop()
                raise
        finally:
            if sock is not None:
                sock.close()

    async def _received(self, message_type):
        """containerd's messages of `message_type` (others are logged and skipped) until its
        CloseSend; a connection lost before it ends them too, noted in `_lost`."""
        try:
            while (message := await self._stream.recv()) is not None:
                unpacked = unpack(message, message_type)
                if unpacked is None:
                    log.warning("stream %s: ignoring a %s (expected a %s)", self._id,
                                message.type_url, message_type.DESCRIPTOR.full_name)
                    continue
                yield unpacked
        except RpcError as e:
            log.info("stream %s ended without CloseSend: %s", self._id, e)
            self._lost = True

    async def _send_output(self, sock: socket.socket, pending: bytes) -> bytes | None:
        """Socket -> Data messages within containerd's window, until the socket's EOF (None).
        When containerd ends the stream (CloseSend) before, None too: the socket is closed and
        the process's pump drops the rest instead of blocking the container. When the
        connection is lost: what was read and not sent, to resume with."""
        granted = asyncio.Event()
        window = 0

        async def read_grants() -> None:
            nonlocal window
            async for update in self._received(transfer.WindowUpdate):
                window += update.update
                granted.set()

        grants = asyncio.ensure_future(read_grants())
        try:
            while True:
                if window <= 0:
                    granted.clear()
                    waiting = asyncio.ensure_future(granted.wait())
                    await asyncio.wait({waiting, grants}, return_when=asyncio.FIRST_COMPLETED)
                    waiting.cancel()
                    if window <= 0:  # grants ended: containerd will read no more here
                        return pending if self._lost else None
                data = pending[:window] if pending else await read_chunk(sock.fileno(),
                                                                         min(window, MAX_DATA))
                if not data:
                    return None
                pending = pending[len(data):]
                try:
                    await self._stream.send(pack(transfer.Data(data=data)))
                except ConnectionError:
                    return data + pending
                window -= len(data)
        finally:
            grants.cancel()

    async def _receive_input(self, sock: socket.socket) -> bool:
        """Data messages -> socket until containerd's CloseSend (stdin's EOF: the socket is
        shut). True when the connection was lost before it (stdin stays open, to resume)."""
        granting = True

        async def grant(size: int) -> None:
            nonlocal granting
            try:
                await self._stream.send(pack(transfer.WindowUpdate(update=size)))
            except ConnectionError:  # closed after containerd's CloseSend: drain what arrived
                granting = False

        sock.setblocking(False)
        await grant(WINDOW)
        async for data in self._received(transfer.Data):
            try:
                await write_all(sock.fileno(), data.data)
            except OSError:  # stdin closed (CloseIO or the process is gone)
                return False
            if data.data and granting:
                await grant(len(data.data))
        if self._lost:
            return True
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        return False


def methods(ctx) -> dict:
    """The service's methods for Server.register_lazy (see vmm_task.services)."""
    from vmm_common import ttrpc

    async def stream(call, _ctx) -> None:
        first = await call.recv()
        init = None if first is None else unpack(first, streaming_pb2.StreamInit)
        if init is None or not init.id:
            raise ttrpc.RpcError(ttrpc.Code.INVALID_ARGUMENT,
                                 "Stream: the first message must be a StreamInit with an id")
        peer = TtrpcStreamPeer(call, init.id)
        try:
            STREAMS.offer(init.id, peer)
        except TaskError as e:
            raise ttrpc.RpcError(ttrpc.Code[e.code], f"Stream: {e}") from None
        try:
            await call.send(pack(empty_pb2.Empty()))  # the ack containerd waits for
            await asyncio.shield(peer.finished)
        finally:
            # cancelled when the connection closed: containerd closes it right after its
            # CloseSend, so an attached pump goes on alone with what was received
            STREAMS.forget(init.id, peer)

    return {"Stream": ttrpc.bidi_stream(any_pb2.Any, stream)}
