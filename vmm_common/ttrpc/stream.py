"""Streams of messages on one ttrpc stream id, as handlers and callers see them."""
from google.protobuf.message import DecodeError, Message

from . import frame as fr
from .channel import Channel
from .errors import Code, RpcError
from .inbox import Inbox


class _Receiving:
    """recv()/async-for over the messages the peer sent on this stream."""

    def __init__(self, inbox: Inbox, message_type: type[Message]):
        self._inbox = inbox
        self._type = message_type

    async def recv(self) -> Message | None:
        """The next message, or None once the peer has closed its side."""
        payload = await self._inbox.get()
        if payload is None:
            return None
        try:
            return self._type.FromString(payload)
        except DecodeError as e:
            raise RpcError(Code.INVALID_ARGUMENT,
                           f"undecodable {self._type.DESCRIPTOR.full_name}: {e}") from None

    def __aiter__(self):
        return self

    async def __anext__(self) -> Message:
        message = await self.recv()
        if message is None:
            raise StopAsyncIteration
        return message


class ServerStream(_Receiving):
    """A handler's side of a streaming call: recv() the client's messages, send() its own."""

    def __init__(self, channel: Channel, stream_id: int, inbox: Inbox,
                 request_type: type[Message]):
        super().__init__(inbox, request_type)
        self._channel = channel
        self.stream_id = stream_id

    async def send(self, message: Message) -> None:
        await self._channel.send(self.stream_id, fr.DATA, 0, message.SerializeToString())
