"""One accepted ttrpc connection: reads frames, runs each request as its own task.

A broken peer (oversized frame, bad header, undecodable envelope) ends only this
connection; a failing handler ends only its call, as a status.
"""
import asyncio
import logging
from collections.abc import Callable

from google.protobuf.message import DecodeError, Message

from vmm_common.protos.google.rpc.status_pb2 import Status
from vmm_common.protos.ttrpc.request_pb2 import Request, Response

from . import frame as fr
from .channel import Channel
from .context import CallContext, decode_metadata
from .errors import Code, ProtocolError, RpcError
from .inbox import Inbox
from .methods import Method
from .stream import ServerStream

log = logging.getLogger("vmm_common.ttrpc")

# Requests one connection may have in flight; more are refused with RESOURCE_EXHAUSTED.
MAX_IN_FLIGHT = 1024


class _Call:
    def __init__(self, method: Method, inbox: Inbox | None):
        self.method = method
        self.inbox = inbox
        self.task: asyncio.Task | None = None


class ServerConnection:
    def __init__(self, lookup: Callable[[str, str], Method], channel: Channel, peer: str):
        self._lookup = lookup  # Server.lookup: the Method of (service, method) or RpcError
        self._channel = channel
        self._peer = peer
        self._calls: dict[int, _Call] = {}
        self._last_stream_id = 0

    async def run(self) -> None:
        try:
            while (frame := await self._channel.recv()) is not None:
                await self._on_frame(frame)
        except ProtocolError as e:
            log.warning("ttrpc: closing connection from %s: %s", self._peer, e)
        except OSError as e:
            log.debug("ttrpc: connection from %s lost: %s", self._peer, e)
        except Exception:  # a bug here must cost one connection, never the server
            log.exception("ttrpc: closing connection from %s after an internal error", self._peer)
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        """The client is gone: its handlers have no one to answer (as ctx cancel in Go). What it
        sent stays readable; a stream it left open then ends CANCELLED (no more will come)."""
        for call in self._calls.values():
            if call.inbox is not None:
                call.inbox.end(RpcError(Code.CANCELLED, "the client closed the connection"))
        tasks = [c.task for c in self._calls.values() if c.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._channel.close()

    async def _on_frame(self, frame: fr.Frame) -> None:
        if frame.stream_id % 2 == 0:
            raise ProtocolError(f"client stream id {frame.stream_id} is even")
        if frame.type == fr.REQUEST:
            await self._on_request(frame)
        elif frame.type == fr.DATA:
            await self._on_data(frame)
        else:
            raise ProtocolError(f"response frame sent to a server (stream {frame.stream_id})")

    async def _on_request(self, frame: fr.Frame) -> None:
        try:
            request = Request.FromString(frame.data)
        except DecodeError as e:
            raise ProtocolError(f"undecodable request envelope on stream {frame.stream_id}: {e}")
        sid = frame.stream_id
        if sid <= self._last_stream_id:
            await self._reply_status(sid, Code.INVALID_ARGUMENT,
                                     f"stream id {sid} reused: ids must increase")
            return
        self._last_stream_id = sid
        name = f"{request.service}/{request.method}"
        try:
            method = self._lookup(request.service, request.method)
        except RpcError as e:
            await self._reply_status(sid, e.code, e.message)
            return
        if len(self._calls) >= MAX_IN_FLIGHT:
            await self._reply_status(sid, Code.RESOURCE_EXHAUSTED,
                                     f"{name}: {MAX_IN_FLIGHT} calls already in flight")
            return
        call = _Call(method, Inbox() if method.streaming else None)
        if method.streaming_client and request.payload:
            await call.inbox.put(request.payload)  # the first message may ride on the request
        self._calls[sid] = call
        call.task = asyncio.create_task(self._run_call(sid, call, request), name=f"ttrpc {name}")

    async def _on_data(self, frame: fr.Frame) -> None:
        call = self._calls.get(frame.stream_id)
        if call is None or call.inbox is None or not call.method.streaming_client:
            # Late data for a finished call is normal (the handler may return early).
            log.debug("ttrpc: %s: data for stream %d that takes none, dropped",
                      self._peer, frame.stream_id)
            return
        if not frame.flags & fr.FLAG_NO_DATA and not call.inbox.ended:
            if not await call.inbox.put(frame.data):
                call.inbox.end(RpcError(Code.RESOURCE_EXHAUSTED, "stream receive buffer full"))
                call.task.cancel()
                await self._reply_status(frame.stream_id, Code.RESOURCE_EXHAUSTED,
                                         "handler is not reading its stream")
                return
        if frame.flags & fr.FLAG_REMOTE_CLOSED:
            call.inbox.end()

    async def _run_call(self, sid: int, call: _Call, request: Request) -> None:
        method = call.method
        ctx = CallContext(request.service, request.method, decode_metadata(request.metadata))
        timeout = request.timeout_nano / 1e9 if request.timeout_nano else None
        if timeout is not None:
            ctx.deadline = asyncio.get_running_loop().time() + timeout
        delivered = False
        try:
            try:
                async with asyncio.timeout(timeout) as deadline:
                    result = await self._invoke(sid, call, request, ctx)
            except TimeoutError:
                if not deadline.expired():
                    raise
                raise RpcError(Code.DEADLINE_EXCEEDED,
                               f"{ctx.service}/{ctx.method}: deadline of {timeout:.3f}s exceeded")
            payload = self._encode_result(ctx, method, result)
        except RpcError as e:
            await self._reply_status(sid, e.code, e.message)
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # the connection is going away: nobody to answer
            await self._reply_status(sid, Code.CANCELLED, f"{ctx.service}/{ctx.method} was cancelled")
        except (Exception, SystemExit) as e:  # a handler must never take the agent down
            log.exception("ttrpc: handler %s/%s failed", ctx.service, ctx.method)
            await self._reply_status(sid, Code.INTERNAL, f"{type(e).__name__}: {e}")
        else:
            if method.streaming_server:
                flags = fr.FLAG_REMOTE_CLOSED | (0 if payload else fr.FLAG_NO_DATA)
                delivered = await self._send(sid, fr.DATA, flags, payload)
            else:
                delivered = await self._reply(sid, Response(status=Status(code=Code.OK),
                                                            payload=payload))
        finally:
            self._calls.pop(sid, None)
            if not delivered:
                _run_undelivered(ctx)

    async def _invoke(self, sid: int, call: _Call, request: Request, ctx: CallContext):
        method = call.method
        if method.streaming_client:
            stream = ServerStream(self._channel, sid, call.inbox, method.request_type)
            return await method.handler(stream, ctx)
        try:
            req = method.request_type.FromString(request.payload)
        except DecodeError as e:
            raise RpcError(Code.INVALID_ARGUMENT,
                           f"undecodable {method.request_type.DESCRIPTOR.full_name}: {e}") from None
        if method.streaming_server:
            call.inbox.end()  # the request was the client's only message
            stream = ServerStream(self._channel, sid, call.inbox, method.request_type)
            return await method.handler(req, stream, ctx)
        return await method.handler(req, ctx)

    @staticmethod
    def _encode_result(ctx: CallContext, method: Method, result) -> bytes:
        if result is None and method.streaming_server:
            return b""
        if not isinstance(result, Message):
            raise RpcError(Code.INTERNAL, f"{ctx.service}/{ctx.method} handler returned "
                                          f"{type(result).__name__}, not a protobuf message")
        payload = result.SerializeToString()
        if len(payload) > fr.MAX_DATA_SIZE - 64:  # room for the Response envelope
            raise RpcError(Code.RESOURCE_EXHAUSTED, f"{ctx.service}/{ctx.method}: response of "
                                                    f"{len(payload)} bytes exceeds the 4 MiB limit")
        return payload

    async def _reply_status(self, sid: int, code: Code, message: str) -> None:
        await self._reply(sid, Response(status=Status(code=code, message=message)))

    async def _reply(self, sid: int, response: Response) -> bool:
        return await self._send(sid, fr.RESPONSE, 0, response.SerializeToString())

    async def _send(self, sid: int, msg_type: int, flags: int, data: bytes) -> bool:
        """Whether the frame was written (False: the peer is gone)."""
        try:
            await self._channel.send(sid, msg_type, flags, data)
        except OSError as e:
            log.debug("ttrpc: %s: cannot answer stream %d: %s", self._peer, sid, e)
            return False
        return True


def _run_undelivered(ctx: CallContext) -> None:
    for callback in ctx.undelivered:
        try:
            callback()
        except Exception:  # one bad callback must not skip the others or end the connection
            log.exception("ttrpc: %s/%s: undelivered callback failed", ctx.service, ctx.method)
