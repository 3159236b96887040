"""One containerd connection to a pod's task.sock, held by the relay.

containerd sees a ttrpc server that never goes away: every frame it sends is checked (a broken
header closes this connection only), forwarded to the daemon when one is connected, and the
frames of each call are kept until the daemon's answer for that stream passes back through.
While no daemon is connected nothing is answered and nothing is lost: a new daemon is sent the
kept frames again (`replay()`), so a Wait held across a daemon restart is answered by the
daemon that sees the process exit.

A streaming call (containerd's Streaming service, `io_type = "streaming"`) lives as long as its
stdio stream, and its data frames (stdin bytes, window updates) are the daemon's to deliver once
it has them: of a call's data only the first frame (a stream's init) and the one closing the
client's side stay kept, and those that came while no daemon was connected until the next one
got them. A replayed request on which the previous daemon had already answered something is
flagged RESUMED, so that the new daemon goes on with the stream instead of beginning it again.

Memory is bounded per connection: at most MAX_KEPT_CALLS unanswered calls and MAX_KEPT_BYTES of
their frames (a request beyond either is answered RESOURCE_EXHAUSTED by the relay itself, the
connection stays), and MAX_UNREAD bytes of answers containerd has not read (beyond it the
connection is closed: that peer is stuck).
"""
from . import wire
from .peer import RECV_CHUNK, Peer

MAX_KEPT_CALLS = 1024                 # as many as the daemon's ttrpc server runs per connection
MAX_KEPT_BYTES = 2 * wire.TTRPC_MAX_DATA
MAX_UNREAD = 2 * wire.TTRPC_MAX_DATA


class Conn(Peer):
    def __init__(self, relay, conn_id: int, pod: str, sock):
        """`relay.received(conn, frame)` gets each frame to forward, `relay.drop(conn, why)` is
        told when the connection must end."""
        self.id = conn_id
        self.pod = pod
        self.kept: dict[int, list[bytes]] = {}  # stream id -> its frames, until answered
        self.kept_bytes = 0
        self.answered: set[int] = set()       # kept streams the daemon has sent frames on
        self.last_request = 0                 # request stream ids must increase (as ttrpc's)
        super().__init__(relay, sock)

    def lost(self, reason: str) -> None:
        self.relay.drop(self, reason)

    def _receive(self) -> bytes:
        return self.sock.recv(RECV_CHUNK)

    def _take(self, data: bytes) -> None:
        self.inbound += data
        try:
            for stream_id, msg_type, flags, frame in wire.take(self.inbound, wire.TTRPC_MAX_DATA):
                self._from_peer(stream_id, msg_type, flags, frame)
                if self.closed:
                    return
        except wire.WireError as e:
            self.lost(f"protocol error: {e}")

    def _from_peer(self, stream_id: int, msg_type: int, flags: int, frame: bytes) -> None:
        if stream_id % 2 == 0:
            self.lost(f"protocol error: client stream id {stream_id} is not odd")
        elif msg_type == wire.TTRPC_REQUEST:
            self._request(stream_id, frame)
        elif msg_type == wire.TTRPC_DATA:
            frames = self.kept.get(stream_id)
            if frames is None:
                return  # data for a finished call (the server may answer early): nobody wants it
            if len(frames) < 2 or flags & wire.TTRPC_FLAG_REMOTE_CLOSED or self.relay.session is None:
                if self.kept_bytes + len(frame) > MAX_KEPT_BYTES:
                    self.lost(f"stream {stream_id}: more than {MAX_KEPT_BYTES} bytes unanswered")
                    return
                self._keep(frames, frame)
            self.relay.received(self, frame)
        else:
            self.lost(f"protocol error: message type {msg_type:#04x} on stream {stream_id} "
                      "(a client sends requests and data)")

    def _request(self, stream_id: int, frame: bytes) -> None:
        if stream_id <= self.last_request:
            self.send(wire.error_response(stream_id, wire.INVALID_ARGUMENT,
                                          f"stream id {stream_id} reused: ids must increase"))
            return
        self.last_request = stream_id
        if len(self.kept) >= MAX_KEPT_CALLS or self.kept_bytes + len(frame) > MAX_KEPT_BYTES:
            self.send(wire.error_response(
                stream_id, wire.RESOURCE_EXHAUSTED,
                f"vmm-sandboxer task relay: {len(self.kept)} calls ({self.kept_bytes} bytes) "
                "of this connection are unanswered; refused"))
            return
        self._keep(self.kept.setdefault(stream_id, []), frame)
        self.relay.received(self, frame)

    def _keep(self, frames: list, frame: bytes) -> None:
        frames.append(frame)
        self.kept_bytes += len(frame)

    def send(self, frame: bytes) -> None:
        """A frame for containerd (the daemon's answer, or the relay's own); the call it ends
        is no longer kept."""
        stream_id, msg_type, flags = wire.ttrpc_header(frame)
        if wire.ends_stream(msg_type, flags):
            self.kept_bytes -= sum(map(len, self.kept.pop(stream_id, ())))
            self.answered.discard(stream_id)
        elif stream_id in self.kept:
            self.answered.add(stream_id)
        self.outbox.write(frame)
        if self.outbox.size > MAX_UNREAD:
            self.lost(f"the peer does not read: {self.outbox.size} bytes of answers unread")

    def replay(self) -> list[tuple[int, bytes]]:
        """(flags, frame) of every frame of the unanswered calls for a new daemon, each call's in
        the order received, calls in the order they began (so request stream ids increase, as a
        ttrpc server requires); a stream's data beyond its init and end is handed over with it
        and no longer kept."""
        frames = []
        for stream_id, kept in self.kept.items():
            frames.append((wire.RESUMED if stream_id in self.answered else 0, kept[0]))
            frames += [(0, frame) for frame in kept[1:]]
            self.kept[stream_id] = kept[:2] + [f for f in kept[2:]
                                                if wire.ttrpc_header(f)[2] & wire.TTRPC_FLAG_REMOTE_CLOSED]
        self.kept_bytes = sum(len(f) for kept in self.kept.values() for f in kept)
        return frames

    def state(self) -> dict:
        return {**super().state(), "id": self.id, "pod": self.pod, "last_request": self.last_request,
                "kept": [[sid, [f.hex() for f in frames]] for sid, frames in self.kept.items()],
                "answered": sorted(self.answered)}

    def restore(self, state: dict) -> None:
        super().restore(state)
        self.last_request = state["last_request"]
        self.answered = set(state.get("answered", ()))  # absent in a relay re-executed from older code
        for stream_id, frames in state["kept"]:
            for frame in frames:
                self._keep(self.kept.setdefault(stream_id, []), bytes.fromhex(frame))
