"""The relay re-executed in place (SIGHUP): an upgrade that keeps containerd's connections.

Everything the relay holds goes into a memfd: the control listener, the daemon's session, each
pod's listener and each connection, as inherited fds, with the bytes in flight (a frame half
received, answers not yet written, the calls kept for a replay). The process then execs itself
from the code installed now: the same pid and start time, so the daemon's record of it stays
true, and the new code rebuilds the relay from the memfd (`restore`). No peer sees a change.
New code that cannot start loses every connection, as a crash would: check it first.
"""
import json
import os
import socket

from host_sandboxer import lean_python

from .conn import Conn
from .control import Session
from .relay import Relay

MODULE = "host_sandboxer.taskrelay.serve"


def execute(relay: Relay, control: socket.socket, control_socket: str) -> None:
    """exec the relay anew with its state; returns only by raising OSError (nothing changed)."""
    state = {"control": control.fileno(), "next_conn": relay.next_conn,
             "listeners": {pod: listener.fileno() for pod, listener in relay.listeners.items()},
             "conns": [conn.state() for conn in relay.conns.values()],
             "session": relay.session.state() if relay.session is not None else None}
    fds = [state["control"], *state["listeners"].values(), *(c["fd"] for c in state["conns"])]
    if state["session"] is not None:
        fds += [state["session"]["fd"], *state["session"]["fds"]]
    memfd = os.memfd_create("task-relay-state", 0)  # no MFD_CLOEXEC: the new image reads it
    try:
        with os.fdopen(os.dup(memfd), "wb") as f:
            f.write(json.dumps(state).encode())
        os.lseek(memfd, 0, os.SEEK_SET)
        for fd in fds:
            os.set_inheritable(fd, True)
        argv = lean_python.command(MODULE, control_socket, "--restore", str(memfd))
        os.execv(argv[0], argv)
    except OSError:
        for fd in fds:
            os.set_inheritable(fd, False)
        raise
    finally:
        os.close(memfd)  # reached only if exec failed


def restore(loop, memfd: int) -> tuple[Relay, socket.socket]:
    """The relay and control listener `execute` handed over in `memfd`."""
    with os.fdopen(memfd, "rb") as f:
        state = json.loads(f.read())
    relay = Relay(loop)
    control = _owned(state["control"])
    for pod, fd in state["listeners"].items():
        relay.listen(pod, _owned(fd))
    for saved in state["conns"]:
        Conn.restore(relay.add_conn(saved["id"], saved["pod"], _owned(saved["fd"])), saved)
    relay.next_conn = state["next_conn"]
    if state["session"] is not None:
        relay.session = Session(relay, _owned(state["session"]["fd"]))
        relay.session.restore(state["session"])
    return relay, control


def _owned(fd: int) -> socket.socket:
    os.set_inheritable(fd, False)
    return socket.socket(fileno=fd)
