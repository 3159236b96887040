"""Stdio over containerd's Streaming service (`io_type = "streaming"`): the rendezvous between a
process's stream string and the stream containerd opens on the task address.

A Create/Exec stream string `ttrpc+<unix|vsock|hvsock>://ADDRESS?streaming_id=ID` names a stream
containerd opens with `containerd.services.streaming.v1.Streaming/Stream`, its first message a
StreamInit carrying ID. CRI opens the streams before it creates the task, a plain client may open
them after: whichever comes first waits here for the other, keyed by ID. The stream itself is
spoken by vmm_task/services/streaming.py (a `StreamPeer`); this side only sees a socket whose
other end the peer pumps, so the process's pipes are pumped as for any other endpoint.
"""

import asyncio
import socket
from urllib.parse import parse_qs

from .endpoints import Endpoint
from .errors import already_exists, invalid_argument

STREAM_SCHEMES = ("ttrpc+unix", "ttrpc+vsock", "ttrpc+hvsock")
_OTHER_PROTOCOL = "grpc+"


class StreamPeer:
    """What the Streaming service offers for one ID: `attach(sock, output)` hands it the socket
    to pump (output: socket -> stream; input: stream -> socket); `finished` resolves when it is
    done with the stream, which then ends."""

    finished: asyncio.Future

    def attach(self, sock: socket.socket, output: bool, pending: bytes = b"") -> None:
        """`pending`: output read from `sock` that an earlier stream with this ID did not send."""
        raise NotImplementedError

    def stop(self) -> None:
        """End the stream now (the process was deleted)."""
        raise NotImplementedError


class StreamRegistry:
    """Stream IDs -> the future of their peer, created by whichever side asks first."""

    def __init__(self):
        self._slots: dict[str, asyncio.Future] = {}

    def _slot(self, stream_id: str) -> asyncio.Future:
        slot = self._slots.get(stream_id)
        if slot is None:
            slot = self._slots[stream_id] = asyncio.get_running_loop().create_future()
        return slot

    def offer(self, stream_id: str, peer: StreamPeer) -> None:
        """The service: containerd opened stream `stream_id`. ALREADY_EXISTS while another stream
        with that ID is waiting or in use."""
        slot = self._slot(stream_id)
        if slot.done():
            raise already_exists(f"stream {stream_id!r} is already open")
        slot.set_result(peer)

    async def take(self, stream_id: str) -> StreamPeer:
        """The process: its stream, once containerd opened it."""
        return await asyncio.shield(self._slot(stream_id))

    def forget(self, stream_id: str, peer: StreamPeer | None = None) -> StreamPeer | None:
        """Drop `stream_id` (only while `peer` is the one offered, when given: a handler cleaning
        up after itself); returns the peer that was offered, if any."""
        slot = self._slots.get(stream_id)
        if slot is None:
            return None
        offered = slot.result() if slot.done() and not slot.cancelled() else None
        if peer is not None and offered is not peer:
            return None
        del self._slots[stream_id]
        if offered is None:
            slot.cancel()
        return offered


STREAMS = StreamRegistry()  # one agent per process, as AgentContext


def stream_id_of(stream: str, uri: str) -> str | None:
    """The streaming ID of a Streaming stream string, None for any other string;
    INVALID_ARGUMENT for a gRPC one (the agent speaks ttrpc) or one without an ID."""
    scheme, sep, rest = uri.partition("://")
    if not sep or "+" not in scheme:
        return None
    if scheme not in STREAM_SCHEMES:
        hint = " (the agent serves ttrpc only)" if scheme.startswith(_OTHER_PROTOCOL) else ""
        raise invalid_argument(f"{stream} {uri!r}: unsupported streaming scheme {scheme!r}{hint};"
                               f" expected one of {', '.join(STREAM_SCHEMES)}")
    ids = parse_qs(rest.partition("?")[2]).get("streaming_id", [])
    if len(ids) != 1 or not ids[0]:
        raise invalid_argument(f"{stream} {uri!r}: expected exactly one streaming_id=ID")
    return ids[0]


class StreamEndpoint(Endpoint):
    """A stream of containerd's Streaming service. open_* wait for containerd to open it, then
    return our end of a socket pair whose other end the stream's peer pumps."""

    def __init__(self, uri: str, stream_id: str, registry: StreamRegistry = STREAMS):
        self.uri = uri
        self.stream_id = stream_id
        self._registry = registry
        self._peer: StreamPeer | None = None

    async def _open(self, output: bool) -> int:
        self._peer = await self._registry.take(self.stream_id)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        self._peer.attach(theirs, output)
        return ours.detach()

    async def open_writer(self) -> int:
        return await self._open(output=True)

    async def open_reader(self) -> int:
        return await self._open(output=False)

    async def delivered(self) -> None:
        if self._peer is not None:
            await asyncio.shield(self._peer.finished)

    def close(self) -> None:
        """The process is deleted: its streams end, whether attached or still waiting."""
        for peer in {self._registry.forget(self.stream_id), self._peer} - {None}:
            peer.stop()
