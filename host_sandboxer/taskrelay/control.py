"""The relay's end of its control connection to the daemon (the session).

One daemon at a time: a new connection replaces the old one. The daemon's messages
(wire.py: LISTEN with the listening socket's fd, UNLISTEN, SEND, CLOSE) are read as they come;
what the relay tells the daemon goes out through an Outbox. The daemon is trusted (the control
socket is 0600 in a 0700 directory), yet a malformed message ends the session, never the relay.
"""
import logging
import os
import socket

from . import wire
from .peer import RECV_CHUNK, Peer

log = logging.getLogger("host_sandboxer.taskrelay")

MAX_FDS = 16  # per read; each LISTEN carries one


class Session(Peer):
    def __init__(self, relay, sock: socket.socket):
        self.fds: list[int] = []  # received, not yet claimed by their LISTEN message
        super().__init__(relay, sock)

    def lost(self, reason: str) -> None:
        self.relay.end_session(self, reason)

    def send(self, kind: int, conn: int, payload: bytes = b"", flags: int = 0) -> None:
        self.outbox.write(wire.message(kind, conn, payload, flags), payload)

    def _receive(self) -> bytes:
        data, fds, flags, _ = socket.recv_fds(self.sock, RECV_CHUNK, MAX_FDS)
        self.fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            raise OSError("a message's file descriptors were cut off")
        return data

    def _take(self, data: bytes) -> None:
        self.inbound += data
        try:
            for conn, kind, _, message in wire.take(self.inbound, wire.MAX_CONTROL_PAYLOAD):
                self._message(conn, kind, message[wire.HEADER_SIZE:])
                if self.closed:
                    return
        except (wire.WireError, UnicodeDecodeError, OSError) as e:
            self.lost(f"bad message from the daemon: {e}")

    def _message(self, conn: int, kind: int, payload: bytes) -> None:
        if kind == wire.SEND:
            self.relay.send(conn, _checked_frame(payload))
        elif kind == wire.LISTEN:
            if not self.fds:
                raise wire.WireError("LISTEN without its socket")
            fd = self.fds.pop(0)
            try:
                listener = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
                raise
            self.relay.listen(payload.decode(), listener)
        elif kind == wire.UNLISTEN:
            self.relay.unlisten(payload.decode())
        elif kind == wire.CLOSE:
            self.relay.close(conn)
        else:
            raise wire.WireError(f"unexpected control message kind {kind}")

    def state(self) -> dict:
        return {**super().state(), "fds": self.fds}

    def restore(self, state: dict) -> None:
        super().restore(state)
        self.fds = list(state["fds"])
        for fd in self.fds:
            os.set_inheritable(fd, False)

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        for fd in self.fds:
            socket.close(fd)
        self.fds.clear()


def _checked_frame(frame: bytes) -> bytes:
    """A server's ttrpc frame as the daemon must send it: whole, a response or data."""
    if len(frame) < wire.HEADER_SIZE:
        raise wire.WireError(f"SEND of {len(frame)} bytes: shorter than a ttrpc header")
    length, _, msg_type, _ = wire.HEADER.unpack_from(frame)
    if length != len(frame) - wire.HEADER_SIZE or msg_type not in (wire.TTRPC_RESPONSE, wire.TTRPC_DATA):
        raise wire.WireError(f"SEND of a malformed ttrpc frame (type {msg_type}, length {length})")
    return frame
