"""Pure-Python ttrpc (containerd/ttrpc PROTOCOL.md): asyncio, stdlib + protobuf only.

Unary calls (the API fixed in docs/internals.md)::

    server = ttrpc.Server()
    server.register("grpc.SandboxService", {"Check": ttrpc.unary(CheckRequest, check)})
    await server.serve(listening_socket)        # AF_UNIX or AF_VSOCK; until cancelled
    client = await ttrpc.Client.connect_unix(path)
    resp = await client.call("grpc.SandboxService", "Check", CheckRequest(), Empty,
                             timeout=5.0, metadata={"k": "v"})

Streaming calls. Server side, register with the shape of the call:

    ttrpc.server_stream(Req, h)  async h(req, stream, ctx): await stream.send(msg) ...
    ttrpc.client_stream(Req, h)  async h(stream, ctx) -> Resp: async for req in stream ...
    ttrpc.bidi_stream(Req, h)    async h(stream, ctx): recv() and send() freely

Client side::

    s = await client.stream(service, method, RespType, first_request_or_None,
                            streaming_client=True, streaming_server=True, timeout=None)
    await s.send(msg); await s.close_send()
    async for resp in s: ...              # or: resp = await s.close_and_recv()

On the wire a streaming Request carries flag remote-open (client will send Data) or
remote-closed (it will not); Data frames carry remote-closed on the last one and
no-data when they hold no message; a server-streaming call ends with Data[remote-closed]
on success or a Response with the error status (as containerd/ttrpc does).

Handlers get a CallContext (service, method, metadata {key: [values]}, deadline from the
request's timeout_nano, enforced by cancelling the handler -> DEADLINE_EXCEEDED).
RpcError(code, message) raised in a handler is the call's status; any other exception
is INTERNAL with its text. Neither affects the connection or the server.
Client and ClientStream are imported on first access (`ttrpc.Client`), not with the package.
"""
from .context import CallContext
from .errors import Code, ProtocolError, RpcError
from .methods import Method, bidi_stream, client_stream, server_stream, unary
from .server import Server
from .stream import ServerStream

__all__ = [
    "CallContext", "Client", "ClientStream", "Code", "Method", "ProtocolError", "RpcError",
    "Server", "ServerStream", "bidi_stream", "client_stream", "server_stream", "unary",
]


def __getattr__(name: str):
    """The client loads on first use: the guest agent only serves, and every module it imports
    costs boot time under emulation."""
    if name in ("Client", "ClientStream"):
        from . import client
        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
