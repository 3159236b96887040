"""How a handler is registered: one constructor per call shape.

    unary(Req, h)          async h(req, ctx) -> Message
    server_stream(Req, h)  async h(req, stream, ctx) -> None       (stream.send(msg) ...)
    client_stream(Req, h)  async h(stream, ctx) -> Message         (async for req in stream)
    bidi_stream(Req, h)    async h(stream, ctx) -> None            (recv and send freely)
"""
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import Message


@dataclass(frozen=True)
class Method:
    request_type: type[Message]
    handler: Callable
    streaming_client: bool = False
    streaming_server: bool = False

    @property
    def streaming(self) -> bool:
        return self.streaming_client or self.streaming_server


def unary(request_type: type[Message], handler: Callable) -> Method:
    return Method(request_type, handler)


def server_stream(request_type: type[Message], handler: Callable) -> Method:
    return Method(request_type, handler, streaming_server=True)


def client_stream(request_type: type[Message], handler: Callable) -> Method:
    return Method(request_type, handler, streaming_client=True)


def bidi_stream(request_type: type[Message], handler: Callable) -> Method:
    return Method(request_type, handler, streaming_client=True, streaming_server=True)
