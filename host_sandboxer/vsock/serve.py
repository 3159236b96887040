"""The hybrid vsock backends of all of a daemon's VMs, in one process of their own, so that
VMs keep their vsock when the daemon restarts.

QEMU 7.2 cannot reconnect a vhost-user-vsock device (HYBRID-VSOCK-NOTES.md): a backend living
in the daemon's event loop would take every pod's vsock with it. One process serves every VM
(this one costs ~7 MB PSS; one per VM would cost that per pod). The daemon reaches a
guest as any hybrid-vsock client does (`CONNECT <port>` on `<vm_dir>/vsock.sock`), so a
restarted daemon simply connects again.

    python -m host_sandboxer.vsock.serve CONTROL_FD

It runs as a uid of its own, without capabilities, and opens nothing by path but what a
guest-initiated stream dials (HybridSockets._dial): the daemon makes the control socket
(CONTROL_FD, listening) and each VM's sockets, and hands them over. The daemon starts it
lean (vmm/node_helper.py, lean_python.py): `python -I -S`, on reactor.py, importing the stdlib
and host_sandboxer.vsock only.

Control socket (the daemon's, 0600), one request line and one answer line per connection:
    ADD <vm_dir>     with two fds (SCM_RIGHTS): the listening <vm_dir>/vhost-vsock.sock (QEMU)
                     and <vm_dir>/vsock.sock; serve them (anew, if served already) -> OK | ERR <why>
    REMOVE <vm_dir>  stop serving it, close its sockets (the daemon removes them) -> OK <VMs left>
    LIST             the VMs served                                   -> OK <vm_dir>\\t<vm_dir>...
    WATCH            stays open: one `DEAD <vm_dir>\\t<reason>` line per VM whose link is gone
A VM's link is gone when QEMU disconnects or a malformed ring reset its device; it is dropped
then. SIGTERM ends the process (every VM's vsock with it). The daemon's side:
host_sandboxer/vmm/vsock_backend.py.
"""

import logging
import os
import signal
import socket
import sys

from .hybrid_sockets import HybridSockets
from .reactor import Reactor

log = logging.getLogger("host_sandboxer.vsock.serve")

MAX_REQUEST = 4096
ADD_FDS = 2  # the sockets an ADD brings: QEMU's vhost-user listener, the hybrid clients' one
USAGE = "usage: python -m host_sandboxer.vsock.serve CONTROL_FD"

class Backends:
    """Every VM's HybridSockets and the daemon's control connections, on one Reactor.

    Answers are a line (a LIST of a thousand VMs is ~60 kB): each is sent whole into the fresh
    connection's socket buffer without waiting; a daemon that does not read loses its answer
    (logged), it never stalls the loop that carries every VM's vsock."""

    def __init__(self, loop: Reactor):
        self.loop = loop
        self.vms: dict[str, HybridSockets] = {}
        self.watchers: set[socket.socket] = set()
        self._requests: dict[socket.socket, tuple[bytes, list[int]]] = {}   # the line so far, fds

    def accept(self, listener: socket.socket) -> None:
        try:
            sock = listener.accept()[0]
        except OSError as e:  # BlockingIOError: another wakeup took it; EMFILE & co: logged
            if not isinstance(e, BlockingIOError):
                log.error("control socket: accept failed: %s", e)
            return
        sock.setblocking(False)
        self._requests[sock] = (b"", [])
        self.loop.add_reader(sock.fileno(), self._on_request, sock)

    def _on_request(self, sock: socket.socket) -> None:
        line, fds = self._requests[sock]
        try:
            data, more, _, _ = socket.recv_fds(sock, MAX_REQUEST, ADD_FDS)
        except BlockingIOError:
            return
        except OSError as e:
            data, more = b"", []
            log.info("control connection: %s", e)
        line, fds = line + data, fds + more
        if data and b"\n" not in line and len(line) < MAX_REQUEST:
            self._requests[sock] = (line, fds)
            return
        del self._requests[sock]
        self.loop.remove_reader(sock.fileno())
        command, _, vm_dir = line.partition(b"\n")[0][:MAX_REQUEST].decode(errors="replace").partition(" ")
        listeners = _sockets(fds)  # an ADD detaches those it keeps
        try:
            if command == "WATCH":
                self.watchers.add(sock)
                self.loop.add_reader(sock.fileno(), self._on_watcher_readable, sock)
                return
            try:
                sock.sendall((self._answer(command, vm_dir, listeners) + "\n").encode())
            except OSError as e:
                log.info("control connection: answer to %s lost: %s", command, e)
            sock.close()
        finally:
            for listener in listeners:
                listener.close()

    def _on_watcher_readable(self, sock: socket.socket) -> None:
        """A WATCH connection stays until the daemon goes (EOF)."""
        try:
            if sock.recv(MAX_REQUEST):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._drop_watcher(sock)

    def _drop_watcher(self, sock: socket.socket) -> None:
        self.loop.remove_reader(sock.fileno())
        self.watchers.discard(sock)
        sock.close()

    def _answer(self, command: str, vm_dir: str, listeners: list[socket.socket]) -> str:
        if command == "LIST":
            return "OK " + "\t".join(self.vms)
        if not os.path.isabs(vm_dir) or any(c in vm_dir for c in "\t\n\0"):
            return f"ERR bad VM directory {vm_dir!r}"
        if command == "ADD":
            return self._add(vm_dir, listeners)
        if command == "REMOVE":
            sockets = self.vms.pop(vm_dir, None)
            if sockets is not None:
                sockets.close()
            return f"OK {len(self.vms)}"
        return f"ERR unknown request {command!r}"

    def _add(self, vm_dir: str, listeners: list[socket.socket]) -> str:
        if len(listeners) != ADD_FDS or any(s.family != socket.AF_UNIX or s.type != socket.SOCK_STREAM
                                            for s in listeners):
            return f"ERR ADD needs {ADD_FDS} unix stream sockets (SCM_RIGHTS), got {len(listeners)}"
        old = self.vms.pop(vm_dir, None)
        if old is not None:  # a VM the daemon never finished starting: a new QEMU comes instead
            old.close()
        sockets = HybridSockets(self.loop, os.path.join(vm_dir, "vhost-vsock.sock"),
                                os.path.join(vm_dir, "vsock.sock"),
                                on_dead=lambda reason: self.loop.call_soon(self._gone, vm_dir, sockets, reason))
        try:
            sockets.start(*(socket.socket(fileno=listener.detach()) for listener in listeners))
        except OSError as e:
            sockets.close()
            return f"ERR {e}"
        self.vms[vm_dir] = sockets
        return "OK"

    def _gone(self, vm_dir: str, sockets: HybridSockets, reason: str) -> None:
        if self.vms.get(vm_dir) is not sockets:
            return  # REMOVEd (or replaced): the daemon asked for it
        del self.vms[vm_dir]
        sockets.close()
        log.info("%s: link gone: %s", vm_dir, reason)
        for watcher in list(self.watchers):
            try:
                watcher.sendall(f"DEAD {vm_dir}\t{reason}\n".encode(errors="replace"))
            except OSError as e:
                log.error("WATCH connection dropped, DEAD %s not told: %s", vm_dir, e)
                self._drop_watcher(watcher)

    def close(self) -> None:
        for sockets in self.vms.values():
            sockets.close()
        self.vms.clear()


def _sockets(fds: list[int]) -> list[socket.socket]:
    """The sockets among `fds` (received with a request); any other fd is closed."""
    found = []
    for fd in fds:
        try:
            found.append(socket.socket(fileno=fd))
        except OSError:  # ENOTSOCK
            os.close(fd)
    return found


def serve(control_fd: int) -> None:
    """Serve until SIGTERM/SIGINT."""
    loop = Reactor()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loop.stop)
    backends = Backends(loop)
    listener = socket.socket(fileno=control_fd)
    listener.setblocking(False)
    loop.add_reader(listener.fileno(), backends.accept, listener)
    try:
        loop.run()
    finally:
        listener.close()
        backends.close()
        loop.close()


def main(argv=None) -> int:
    """One argument, the control socket's fd (no argparse: ~0.3 MB of the process's heap)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not argv[0].isdigit():
        print(USAGE, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s vsock-backend: %(message)s")
    serve(int(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
