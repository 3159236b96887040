"""containerd's Streaming service on a pod's task address, for `io_type = "streaming"`.

containerd 2.4's CRI (internal/cri/io/streaming.go, helpers.go `newStreams`) opens one
`containerd.services.streaming.v1.Streaming/Stream` call per stdio stream, on its own
connection to the address Controller.Start returned (our task.sock, so through the task relay),
sends `StreamInit{id}` (`<container or exec id>-stdin`, `-stdout`, `-stderr`) and waits for one
message back, all before it creates the task; Create/Exec then name each stream
`ttrpc+unix://<task.sock>?streaming_id=<id>`. The daemon answers the init at once and parks the
call in the pod's `StreamHub` until the process's stdio relay (stdio.py) takes it: the relay
bridges it to the guest's acknowledged port as it bridges a FIFO, so the guest keeps every byte
containerd has not been handed yet.

Messages are google.protobuf.Any with containerd's type URLs (the bare full name). Output:
containerd grants bytes with WindowUpdate (64 KiB at a time); Data of at most 32 KiB, never
beyond the window; the call's end (OK) is the stream's EOF. Input: we grant 64 KiB, and again
as many bytes as the guest took; containerd's CloseSend is stdin's EOF.
"""

import asyncio
import logging
from urllib.parse import parse_qs, urlsplit

import grpc
from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import DecodeError

from host_sandboxer.taskproxy.errors import HostError
from host_sandboxer.taskrelay.link import RESUMED_METADATA
from vmm_common import ttrpc
from vmm_common.protos.containerd.services.streaming.v1 import streaming_pb2
from vmm_common.protos.containerd.types.transfer import streaming_pb2 as transfer
from vmm_common.ttrpc import Code, RpcError

log = logging.getLogger(__name__)

SERVICE = "containerd.services.streaming.v1.Streaming"
MAX_DATA = 32 * 1024   # containerd's maxRead: what one Data carries at most
WINDOW = 2 * MAX_DATA  # containerd's windowSize: what one grant gives
SCHEMES = ("ttrpc+unix", "ttrpc+vsock", "ttrpc+hvsock")


def stream_id(stream: str, uri: str) -> str | None:
    """The streaming ID a stdio string names, None for a path (a FIFO); INVALID_ARGUMENT for a
    URI this daemon cannot serve (containerd's CRI only ever names the pod's task address)."""
    if "://" not in uri:
        return None
    parts = urlsplit(uri)
    if parts.scheme not in SCHEMES:
        raise HostError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"{stream} {uri!r}: only streams over ttrpc ({', '.join(SCHEMES)}) are served")
    ids = parse_qs(parts.query).get("streaming_id", [])
    if len(ids) != 1 or not ids[0]:
        raise HostError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"{stream} {uri!r}: needs exactly one non-empty streaming_id")
    return ids[0]


def pack(message) -> any_pb2.Any:
    """containerd's typeurl names a proto type by its full name alone (no type.googleapis.com/)."""
    return any_pb2.Any(type_url=message.DESCRIPTOR.full_name, value=message.SerializeToString())


def unpack(packed: any_pb2.Any | None, message_type):
    """`packed` as `message_type`, or None when it is absent, another type, or undecodable."""
    if packed is None or packed.type_url.rsplit("/", 1)[-1] != message_type.DESCRIPTOR.full_name:
        return None
    try:
        return message_type.FromString(packed.value)
    except DecodeError:
        return None


class ContainerdStream:
    """One Stream call of containerd's, as a relay uses it. A call whose connection is gone
    (containerd restarted) raises ConnectionError; `finish()` ends the call (OK)."""

    def __init__(self, call, ident: str, window: int = 0):
        self.id = ident
        self._call = call
        self._window = window
        self._changed = asyncio.Event()  # a grant came, or containerd's side ended
        self._closed_send = False        # containerd will send nothing more (CloseSend)
        self._lost: str | None = None
        self._grants: asyncio.Task | None = None
        self.done = asyncio.get_running_loop().create_future()

    def lost(self, why: str) -> None:
        if self._lost is None:
            self._lost = why
            self._changed.set()
        if self._grants is not None:
            self._grants.cancel()

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        if self._grants is not None:
            self._grants.cancel()

    def _check(self) -> None:
        if self._lost is not None:
            raise ConnectionError(f"stream {self.id}: {self._lost}")

    # -- output: Data within containerd's window ---------------------------------------------

    async def send(self, data: memoryview) -> int:
        """Send up to MAX_DATA bytes of `data` within the window: how many. After containerd's
        CloseSend it reads no more: the bytes are dropped (counted), as for a FIFO's gone reader."""
        if self._grants is None:
            self._grants = asyncio.ensure_future(self._read_grants())
        while self._window <= 0 and not self._closed_send:
            self._check()
            self._changed.clear()
            await self._changed.wait()
        self._check()
        if self._closed_send:
            return len(data)
        count = min(len(data), MAX_DATA, self._window)
        await self._send(transfer.Data(data=bytes(data[:count])))
        self._window -= count
        return count

    async def _read_grants(self) -> None:
        while True:
            try:
                message = await self._call.recv()
            except RpcError as exc:
                self.lost(exc.message)
                return
            if message is None:
                self._closed_send = True
                self._changed.set()
                return
            update = unpack(message, transfer.WindowUpdate)
            if update is None or update.update <= 0:
                log.warning("stream %s: ignoring a %s from containerd", self.id, message.type_url)
                continue
            self._window += update.update
            self._changed.set()

    # -- input: grants, and containerd's Data -----------------------------------------------

    async def grant(self, count: int) -> None:
        await self._send(transfer.WindowUpdate(update=count))

    async def receive(self) -> bytes:
        """The next bytes containerd sent; b"" after its CloseSend (stdin's EOF). What it sent
        before its connection closed is read first (then ConnectionError)."""
        while True:
            try:
                message = await self._call.recv()
            except RpcError as exc:
                self.lost(exc.message)
                self._check()
            if message is None:
                return b""
            data = unpack(message, transfer.Data)
            if data is None:
                log.warning("stream %s: ignoring a %s from containerd", self.id, message.type_url)
            elif data.data:
                return data.data

    async def _send(self, message) -> None:
        self._check()
        try:
            await self._call.send(pack(message))
        except OSError as exc:  # ConnectionResetError: the connection went meanwhile
            self.lost(str(exc))
            self._check()


class StreamHub:
    """The Stream calls of one pod by ID: containerd opens them (before Create/Exec, and again
    after its restart), the relay of the process whose stdio names the ID takes them."""

    def __init__(self):
        self._slots: dict[str, asyncio.Future] = {}

    async def serve(self, call, context) -> None:
        """Streaming/Stream: answer the init, park the call until a relay is done with it.

        A call the task relay replays to a restarted daemon after it was answered (RESUMED) is
        not answered again: containerd's reader would take a second ack for an error and end
        the stream. Its output window restarts at one grant: containerd's ReadByteStream
        keeps at least that much granted (it grants again whenever it holds less), and the
        grants it sent meanwhile may have been lost with the old daemon."""
        init = unpack(await call.recv(), streaming_pb2.StreamInit)
        if init is None or not init.id:
            raise RpcError(Code.INVALID_ARGUMENT, "the first message of a stream must be a StreamInit with an id")
        if context.get(RESUMED_METADATA) is None:
            stream = ContainerdStream(call, init.id)
            await call.send(pack(empty_pb2.Empty()))  # the ack containerd's stream creator waits for
        else:
            stream = ContainerdStream(call, init.id, window=WINDOW)
            log.info("stream %s: resumed from the previous daemon", init.id)
        self._offer(stream)
        try:
            await stream.done
        finally:
            stream.lost("the call ended")
            slot = self._slots.get(init.id)
            if slot is not None and slot.done() and slot.result() is stream:
                del self._slots[init.id]  # parked and never taken (CRI gave up the container)

    def _offer(self, stream: ContainerdStream) -> None:
        slot = self._slots.get(stream.id)
        if slot is not None and not slot.done():
            slot.set_result(stream)  # a relay waits for it
            return
        if slot is not None:  # a parked call with that ID: CRI's new one replaces it
            slot.result().finish()
        self._slots[stream.id] = asyncio.get_running_loop().create_future()
        self._slots[stream.id].set_result(stream)

    async def take(self, ident: str) -> ContainerdStream:
        """The call with ID `ident`, waiting for containerd to open it."""
        slot = self._slots.get(ident)
        if slot is None:
            slot = self._slots[ident] = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.shield(slot)
        finally:
            if self._slots.get(ident) is slot:
                del self._slots[ident]


def register(server: ttrpc.Server, hub: StreamHub) -> None:
    server.register(SERVICE, {"Stream": ttrpc.bidi_stream(any_pb2.Any, hub.serve)})


class StreamSink:
    """A containerd stream as an output relay's sink (stdio.FifoSink's counterpart): each chunk
    is recorded as delivered once its frame is in the task relay's socket (a daemon killed then
    loses nothing). A lost call (containerd restarted) waits for the next call with the same ID,
    which CRI opens; what was sent on the lost one is gone (containerd acknowledges nothing)."""

    def __init__(self, hub: StreamHub, ident: str):
        self._hub, self._id = hub, ident
        self._stream: ContainerdStream | None = None

    async def write(self, data: bytes, mark) -> None:
        view = memoryview(data)
        while view:
            if self._stream is None:
                self._stream = await self._hub.take(self._id)
            try:
                sent = await self._stream.send(view)
            except ConnectionError as exc:
                log.info("%s; waiting for containerd's next stream", exc)
                self._stream = None
                continue
            mark.advance(sent)
            view = view[sent:]

    async def end(self) -> None:
        """The stream's EOF: end containerd's call (taken first if no byte ever came)."""
        if self._stream is None:
            self._stream = await self._hub.take(self._id)
        self._stream.finish()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.finish()
            self._stream = None


class StreamSource:
    """A containerd stream as the stdin relay's source (bytes in, b"" at containerd's CloseSend):
    it grants containerd a window, and again as bytes reach the guest."""

    def __init__(self, hub: StreamHub, ident: str):
        self._hub, self._id = hub, ident
        self._stream: ContainerdStream | None = None

    async def read(self) -> bytes:
        while True:
            if self._stream is None:
                self._stream = await self._hub.take(self._id)
                await self.delivered(WINDOW)
            try:
                data = await self._stream.receive()
            except ConnectionError as exc:
                log.info("%s; waiting for containerd's next stream", exc)
                self._stream = None
                continue
            if not data:
                self.close()
            return data

    async def delivered(self, count: int) -> None:
        """Grant `count` more bytes. A call that is gone is not given up here: what containerd
        sent on it is still read (`read` then moves on)."""
        try:
            await self._stream.grant(count)
        except ConnectionError:
            pass

    def close(self) -> None:
        if self._stream is not None:
            self._stream.finish()
            self._stream = None
