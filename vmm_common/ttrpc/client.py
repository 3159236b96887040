"""The ttrpc client: many calls in flight on one connection, matched by stream id.

The peer may be an untrusted guest: its frames get the same limits as on the server
side, a broken frame or envelope closes the connection, failing every pending call
with UNAVAILABLE, and its error messages are capped (vmm_common.capped_text).
"""
import asyncio
import logging

from google.protobuf.message import DecodeError, Message

from vmm_common.capped_text import capped
from vmm_common.protos.ttrpc.request_pb2 import Request, Response

from . import frame as fr
from .channel import Channel
from .context import Metadata, encode_metadata
from .errors import Code, ProtocolError, RpcError
from .inbox import Inbox
from .stream import _Receiving

log = logging.getLogger("vmm_common.ttrpc")

MAX_STREAM_ID = 0xFFFFFFFF


class _Pending:
    def __init__(self, streaming_server: bool):
        self.inbox = Inbox()
        self.streaming_server = streaming_server


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._channel = Channel(reader, writer)
        self._next_id = 1
        self._pending: dict[int, _Pending] = {}
        self._closed: RpcError | None = None
        self._reader = asyncio.create_task(self._read_loop(), name="ttrpc client reader")

    @property
    def closed(self) -> bool:
        """The connection has ended: every call now fails with UNAVAILABLE (open a new client)."""
        return self._closed is not None

    @classmethod
    async def connect_unix(cls, path: str) -> "Client":
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    async def call(self, service: str, method: str, request: Message,
                   response_type: type[Message], timeout: float | None = None,
                   metadata: Metadata | None = None) -> Message:
        """One unary call; raises RpcError with the server's status (or DEADLINE_EXCEEDED)."""
        sid, pending = self._open(streaming_server=False)
        try:
            await self._send_request(sid, service, method, request.SerializeToString(), 0,
                                     timeout, metadata)
            try:
                async with asyncio.timeout(timeout):
                    payload = await pending.inbox.get()
            except TimeoutError:
                raise RpcError(Code.DEADLINE_EXCEEDED,
                               f"{service}/{method}: no response within {timeout}s") from None
        finally:
            self._pending.pop(sid, None)
        return _decode(response_type, payload or b"")

    async def stream(self, service: str, method: str, response_type: type[Message],
                     request: Message | None = None, *, streaming_client: bool,
                     streaming_server: bool, timeout: float | None = None,
                     metadata: Metadata | None = None) -> "ClientStream":
        """Open a streaming call. `request` is the first (for server-only streaming: the
        only) message. See ClientStream for sending, closing and receiving."""
        sid, pending = self._open(streaming_server)
        flags = fr.FLAG_REMOTE_OPEN if streaming_client else fr.FLAG_REMOTE_CLOSED
        payload = request.SerializeToString() if request is not None else b""
        try:
            await self._send_request(sid, service, method, payload, flags, timeout, metadata)
        except BaseException:
            self._pending.pop(sid, None)
            raise
        return ClientStream(self, sid, pending.inbox, response_type, streaming_client,
                            f"{service}/{method}", timeout)

    async def close(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        self._fail_all("client closed the connection")
        await self._channel.close()

    def _open(self, streaming_server: bool) -> tuple[int, _Pending]:
        if self._closed:
            raise RpcError(self._closed.code, self._closed.message)
        if self._next_id > MAX_STREAM_ID:
            raise RpcError(Code.UNAVAILABLE, "ttrpc connection ran out of stream ids")
        sid, self._next_id = self._next_id, self._next_id + 2
        pending = self._pending[sid] = _Pending(streaming_server)
        return sid, pending

    async def _send_request(self, sid, service, method, payload, flags, timeout, metadata):
        request = Request(service=service, method=method, payload=payload,
                          metadata=encode_metadata(metadata))
        if timeout is not None:
            request.timeout_nano = max(1, int(timeout * 1e9))
        await self.send_frame(sid, fr.REQUEST, flags, request.SerializeToString())

    async def send_frame(self, sid: int, msg_type: int, flags: int, data: bytes) -> None:
        try:
            await self._channel.send(sid, msg_type, flags, data)
        except OSError as e:
            raise RpcError(Code.UNAVAILABLE, f"ttrpc connection lost: {e}") from None

    def forget(self, sid: int) -> None:
        self._pending.pop(sid, None)

    async def _read_loop(self) -> None:
        reason = "server closed the connection"
        try:
            while (frame := await self._channel.recv()) is not None:
                await self._on_frame(frame)
        except ProtocolError as e:
            log.warning("ttrpc client: closing connection: %s", e)
            reason = f"protocol error from server: {e}"
        except OSError as e:
            reason = f"connection lost: {e}"
        except Exception as e:  # never leave callers waiting on a dead reader
            log.exception("ttrpc client: reader failed")
            reason = f"internal error: {e}"
        self._fail_all(reason)
        await self._channel.close()

    def _fail_all(self, reason: str) -> None:
        self._closed = self._closed or RpcError(Code.UNAVAILABLE, f"ttrpc: {reason}")
        for pending in self._pending.values():
            pending.inbox.end(self._closed)
        self._pending.clear()

    async def _on_frame(self, frame: fr.Frame) -> None:
        if frame.type == fr.REQUEST or frame.stream_id % 2 == 0:
            raise ProtocolError(f"server-initiated stream {frame.stream_id} is not supported")
        pending = self._pending.get(frame.stream_id)
        if pending is None:
            log.debug("ttrpc client: frame for finished stream %d dropped", frame.stream_id)
            return
        if frame.type == fr.RESPONSE:
            await self._on_response(frame, pending)
            return
        if not pending.streaming_server:
            raise ProtocolError(f"data frame on stream {frame.stream_id}, which expects a "
                                f"single response")
        if not frame.flags & fr.FLAG_NO_DATA and not await pending.inbox.put(frame.data):
            pending.inbox.end(RpcError(Code.RESOURCE_EXHAUSTED,
                                       "caller is not reading its stream: receive buffer full"))
        if frame.flags & fr.FLAG_REMOTE_CLOSED or pending.inbox.ended:
            pending.inbox.end()
            self._pending.pop(frame.stream_id, None)

    async def _on_response(self, frame: fr.Frame, pending: _Pending) -> None:
        try:
            response = Response.FromString(frame.data)
        except DecodeError as e:
            raise ProtocolError(f"undecodable response envelope on stream {frame.stream_id}: {e}")
        self._pending.pop(frame.stream_id, None)
        if response.status.code != Code.OK:
            # the peer's words, quoted by the host in logs and errors: capped
            pending.inbox.end(RpcError(response.status.code, capped(response.status.message)))
            return
        if response.payload or not pending.streaming_server:
            # The final message of a unary or client-streaming call.
            if not await pending.inbox.put(response.payload):
                pending.inbox.end(RpcError(Code.RESOURCE_EXHAUSTED,
                                           "caller is not reading its stream: receive buffer full"))
        pending.inbox.end()


class ClientStream(_Receiving):
    """A caller's side of a streaming call.

    send(msg) / close_send() while streaming_client; recv() (None at the end) or
    `async for` for the server's messages; close_and_recv() for a client-streaming
    call's single response. A non-OK final status is raised as RpcError by recv().
    """

    def __init__(self, client: Client, stream_id: int, inbox: Inbox,
                 response_type: type[Message], streaming_client: bool, name: str,
                 timeout: float | None):
        super().__init__(inbox, response_type)
        self._client = client
        self.stream_id = stream_id
        self._local_open = streaming_client
        self._name = name
        loop = asyncio.get_running_loop()
        self._deadline = None if timeout is None else loop.time() + timeout

    async def send(self, message: Message) -> None:
        if not self._local_open:
            raise RpcError(Code.FAILED_PRECONDITION, f"{self._name}: sending side is closed")
        await self._client.send_frame(self.stream_id, fr.DATA, 0, message.SerializeToString())

    async def close_send(self) -> None:
        if self._local_open:
            self._local_open = False
            await self._client.send_frame(self.stream_id, fr.DATA,
                                          fr.FLAG_REMOTE_CLOSED | fr.FLAG_NO_DATA, b"")

    async def recv(self) -> Message | None:
        try:
            async with asyncio.timeout_at(self._deadline):
                message = await super().recv()
        except TimeoutError:
            self._client.forget(self.stream_id)
            raise RpcError(Code.DEADLINE_EXCEEDED, f"{self._name}: deadline exceeded") from None
        if message is None:
            self._client.forget(self.stream_id)
        return message

    async def close_and_recv(self) -> Message:
        """End a client-streaming call and return its response."""
        await self.close_send()
        message = await self.recv()
        if message is None:
            raise RpcError(Code.INTERNAL, f"{self._name}: stream ended without a response")
        return message

    def close(self) -> None:
        """Stop listening to this stream (frames still arriving for it are dropped)."""
        self._client.forget(self.stream_id)


def _decode(message_type: type[Message], payload: bytes) -> Message:
    try:
        return message_type.FromString(payload)
    except DecodeError as e:
        raise RpcError(Code.INTERNAL,
                       f"undecodable {message_type.DESCRIPTOR.full_name} in response: {e}") from None
