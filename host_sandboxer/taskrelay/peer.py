"""A socket the relay holds: read on its loop into `inbound` (frames gather there until whole),
written through an Outbox, handed over whole by a re-exec (`state`/`restore`)."""
from .outbox import Outbox

RECV_CHUNK = 256 * 1024


class Peer:
    def __init__(self, relay, sock):
        self.relay = relay
        self.sock = sock
        self.inbound = bytearray()  # a frame not received whole yet
        self.closed = False
        self._taking = False        # inside _take: the frames of one read are being handled
        self.outbox = Outbox(relay.loop, sock, self._write_failed)
        sock.setblocking(False)
        relay.loop.add_reader(sock.fileno(), self._on_readable)

    def _receive(self) -> bytes:
        """One read of the socket (b"" at its end); OSError as the socket raises it."""
        raise NotImplementedError

    def _take(self, data: bytes) -> None:
        """Handle what a read brought (whole frames or messages, the rest kept in `inbound`)."""
        raise NotImplementedError

    def lost(self, reason: str) -> None:
        """The socket failed: the relay lets go of this peer."""
        raise NotImplementedError

    def _on_readable(self) -> None:
        try:
            data = self._receive()
        except BlockingIOError:
            return
        except OSError as e:
            self.lost(f"read failed: {e}")
            return
        if not data:
            partial = f" ({len(self.inbound)} bytes of a message unfinished)" if self.inbound else ""
            self.lost("closed by the peer" + partial)
            return
        self._handle(data)

    def _handle(self, data: bytes) -> None:
        self._taking = True
        try:
            self._take(data)
        finally:
            self._taking = False

    def _write_failed(self, why: str) -> None:
        """The peer went while we wrote to it (EPIPE): what it sent first is taken, then we let
        go. containerd closes a stream's connection right after its last Data and CloseSend
        while a window update may be on its way to it; a killed daemon may leave its last SENDs
        (output it counted as delivered) unread while the relay forwards containerd's next
        frame to it."""
        self.take_rest()
        if not self.closed:
            self.lost(f"write failed: {why}")

    def take_rest(self) -> None:
        """Take what the socket holds now, before the peer is let go (not when called while a
        frame is being taken, whose answer failed: that frame's successors are then left)."""
        while not self.closed and not self._taking:
            try:
                data = self._receive()
            except OSError:  # BlockingIOError: all taken; ECONNRESET and the like: nothing more
                return
            if not data:
                return
            self._handle(data)

    def state(self) -> dict:
        """What a re-exec keeps of it (reexec.py); bytes as hex."""
        return {"fd": self.sock.fileno(), "inbound": self.inbound.hex(), "unsent": self.outbox.pending().hex()}

    def restore(self, state: dict) -> None:
        self.inbound[:] = bytes.fromhex(state["inbound"])
        self.outbox.write(bytes.fromhex(state["unsent"]))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.relay.loop.remove_reader(self.sock.fileno())
        self.outbox.close()
        self.sock.close()
