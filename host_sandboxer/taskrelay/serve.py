"""The task relay process: holds every pod's task address for the daemon, across its restarts.

    python -m host_sandboxer.taskrelay.serve CONTROL_SOCKET [--restore FD]

containerd dials a pod's task address (`ttrpc+unix://<dir>/<pod>/task.sock`) once per container
and takes the connection's end for the end of the runtime: it marks the tasks exited (255). So
the listening sockets and containerd's connections live here, in one lean process per node that
does nothing but move ttrpc frames (relay.py), and the daemon, which answers them, may restart
at will: frames it did not answer are sent to the next daemon (docs/restarts.md).

The daemon starts it (taskrelay/link.py, lean like the vsock backend: `python -I -S`, the
stdlib and this package on reactor.py, no asyncio, no protobuf) and adopts it after a restart.
The control socket is created 0600; one daemon connection at a time (wire.py). SIGTERM ends
it (every connection with it). SIGHUP re-executes it from the code installed now, keeping every
socket and every byte in flight (reexec.py): the relay itself can be upgraded under running pods.
"""
import logging
import os
import resource
import signal
import sys

from host_sandboxer.private_socket import listen_unix
from host_sandboxer.vsock.reactor import Reactor

from . import reexec
from .relay import Relay

log = logging.getLogger("host_sandboxer.taskrelay")

USAGE = "usage: python -m host_sandboxer.taskrelay.serve CONTROL_SOCKET [--restore FD]"


def _raise_fd_limit() -> None:
    """Every containerd connection is an fd here (one per container), and every pod's listener:
    the soft limit (often 1024) goes up to the hard one, as Go raises it for containerd."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(control_socket: str, restore_fd: int | None = None) -> None:
    """Relay until SIGTERM/SIGINT (SIGHUP: re-exec, see reexec.py)."""
    _raise_fd_limit()
    loop = Reactor()
    if restore_fd is None:
        relay, control = Relay(loop), listen_unix(control_socket, 16)
    else:
        relay, control = reexec.restore(loop, restore_fd)
        log.info("re-executed: %d listener(s), %d connection(s) kept", len(relay.listeners), len(relay.conns))
    control.setblocking(False)

    def accept_daemon() -> None:
        try:
            sock = control.accept()[0]
        except OSError as e:  # BlockingIOError: another wakeup took it
            if not isinstance(e, BlockingIOError):
                log.error("control socket: accept failed: %s", e)
            return
        relay.start_session(sock)

    def upgrade() -> None:
        try:
            reexec.execute(relay, control, control_socket)
        except OSError as e:
            log.error("re-exec failed, running on: %s", e)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loop.stop)
    loop.add_signal_handler(signal.SIGHUP, upgrade)
    loop.add_reader(control.fileno(), accept_daemon)
    try:
        loop.run()
    finally:
        relay.close_all()
        control.close()
        if os.path.exists(control_socket):
            os.unlink(control_socket)
        loop.close()


def main(argv=None) -> int:
    """CONTROL_SOCKET, and `--restore FD` after a re-exec (no argparse: ~0.3 MB of heap)."""
    argv = sys.argv[1:] if argv is None else argv
    restore = None
    if len(argv) == 3 and argv[1] == "--restore" and argv[2].isdigit():
        restore = int(argv[2])
    elif len(argv) != 1 or argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s task-relay: %(message)s")
    serve(argv[0], restore)
    return 0


if __name__ == "__main__":
    sys.exit(main())
