"""How a handler is registered: one constructor per call shape.

    unary(Req, h)          async h(req, ctx) -> Message
    server_stream(Req, h)  async h(req, stream, ctx) -> None       (stream.send(msg) ...)
    client_stream(Req, h)  async h(stream, ctx) -> Message         (async for req in stream)
    bidi_stream(Req, h)    async h(stream, ctx) -> None            (recv and send freely)
"""
from collections.abc import Callable

from google.protobuf.message import Message


class Method:
    """A plain class, not a dataclass: @dataclass compiles source at import, slow in the guest."""
    __slots__ = ("request_type", "handler", "streaming_client", "streaming_server")

    def __init__(self, request_type: type[Message], handler: Callable,
                 streaming_client: bool = False, streaming_server: bool = False):
        self.request_type = request_type
        self.handler = handler
        self.streaming_client = streaming_client
        self.streaming_server = streaming_server

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
