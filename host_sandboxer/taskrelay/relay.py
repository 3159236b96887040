"""The relay's state: every pod's task.sock listener, every containerd connection, the daemon.

containerd's connections end only when containerd or the pod's Shutdown ends them, never with
the daemon: a daemon that goes away leaves them open, their calls kept (conn.py); the next daemon
to connect is told every listener and connection and sent every unanswered call again
(`start_session`), then the traffic flows live.
"""
import logging
import socket

from . import wire
from .conn import Conn
from .control import Session

log = logging.getLogger("host_sandboxer.taskrelay")

ACCEPT_RETRY_S = 0.1  # after EMFILE and the like: stop accepting for a moment, do not spin


class Relay:
    def __init__(self, loop):
        self.loop = loop
        self.listeners: dict[str, socket.socket] = {}  # pod id -> its task.sock, listening
        self.conns: dict[int, Conn] = {}
        self.next_conn = 1
        self.session: Session | None = None

    # -- the daemon ---------------------------------------------------------------------

    def start_session(self, sock: socket.socket) -> None:
        """A daemon connected: it replaces any other, learns the state, gets the kept calls."""
        old = self.session
        if old is not None:
            old.take_rest()  # a killed daemon's last SENDs, its end not yet seen
            self.end_session(old, "another daemon connected")
        session = self.session = Session(self, sock)
        for pod in self.listeners:
            session.send(wire.LISTENING, 0, pod.encode())
        for conn in self.conns.values():
            session.send(wire.OPEN, conn.id, conn.pod.encode())
            for flags, frame in conn.replay():
                session.send(wire.RECEIVED, conn.id, frame, flags)
        session.send(wire.SYNCED, 0)
        log.info("daemon connected: %d listener(s), %d connection(s), %d call(s) replayed",
                 len(self.listeners), len(self.conns), sum(len(c.kept) for c in self.conns.values()))

    def end_session(self, session: Session, reason: str) -> None:
        if session is self.session:
            self.session = None
            log.info("daemon session ended (%s); containerd's connections are kept", reason)
        session.close()

    def _tell(self, kind: int, conn: int, payload: bytes = b"") -> None:
        if self.session is not None:
            self.session.send(kind, conn, payload)

    # -- listeners (the daemon's requests) ------------------------------------------------

    def listen(self, pod: str, listener: socket.socket) -> None:
        old = self.listeners.pop(pod, None)
        if old is not None:
            self._stop_accepting(old)
        listener.setblocking(False)
        self.listeners[pod] = listener
        self.loop.add_reader(listener.fileno(), self._accept, pod, listener)

    def unlisten(self, pod: str) -> None:
        """The pod is gone: its listener and connections close."""
        listener = self.listeners.pop(pod, None)
        if listener is not None:
            self._stop_accepting(listener)
        for conn in [c for c in self.conns.values() if c.pod == pod]:
            self.drop(conn, f"pod {pod} was shut down", tell=False)

    def _stop_accepting(self, listener: socket.socket) -> None:
        self.loop.remove_reader(listener.fileno())
        listener.close()

    def _accept(self, pod: str, listener: socket.socket) -> None:
        try:
            sock = listener.accept()[0]
        except BlockingIOError:
            return
        except OSError as e:
            log.error("pod %s: accept failed: %s", pod, e)
            self.loop.remove_reader(listener.fileno())
            self.loop.call_later(ACCEPT_RETRY_S, self._resume_accepting, pod, listener)
            return
        conn = self.add_conn(self.next_conn, pod, sock)
        self._tell(wire.OPEN, conn.id, pod.encode())

    def _resume_accepting(self, pod: str, listener: socket.socket) -> None:
        if self.listeners.get(pod) is listener:
            self.loop.add_reader(listener.fileno(), self._accept, pod, listener)

    # -- connections -----------------------------------------------------------------------

    def add_conn(self, conn_id: int, pod: str, sock: socket.socket) -> Conn:
        conn = self.conns[conn_id] = Conn(self, conn_id, pod, sock)
        self.next_conn = max(self.next_conn, conn_id + 1)
        return conn

    def received(self, conn: Conn, frame: bytes) -> None:
        """A frame from containerd (kept by `conn` until answered): to the daemon, if any."""
        self._tell(wire.RECEIVED, conn.id, frame)

    def send(self, conn_id: int, frame: bytes) -> None:
        """The daemon's frame for a connection (one that closed meanwhile: dropped)."""
        conn = self.conns.get(conn_id)
        if conn is not None:
            conn.send(frame)

    def close(self, conn_id: int) -> None:
        conn = self.conns.get(conn_id)
        if conn is not None:
            self.drop(conn, "closed by the daemon", tell=False)

    def drop(self, conn: Conn, reason: str, tell: bool = True) -> None:
        if conn.closed:
            return
        conn.close()
        del self.conns[conn.id]
        log.info("pod %s: connection %d closed: %s", conn.pod, conn.id, reason)
        if tell:
            self._tell(wire.CLOSED, conn.id)

    def close_all(self) -> None:
        if self.session is not None:
            self.end_session(self.session, "the relay is stopping")
        for conn in list(self.conns.values()):
            self.drop(conn, "the relay is stopping", tell=False)
        for pod in list(self.listeners):
            self.unlisten(pod)
