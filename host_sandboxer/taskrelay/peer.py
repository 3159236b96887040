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
        self.outbox = Outbox(relay.loop, sock, self._write_failed)
        sock.setblocking(False)
        relay.loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        raise NotImplementedError

    def lost(self, reason: str) -> None:
        """The socket failed: the relay lets go of this peer."""
        raise NotImplementedError

    def _write_failed(self, why: str) -> None:
        self.lost(f"write failed: {why}")

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
