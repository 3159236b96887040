"""The hybrid vsock backends of all of a daemon's VMs, in one process of their own, so that
VMs keep their vsock when the daemon restarts.

QEMU 7.2 cannot reconnect a vhost-user-vsock device (HYBRID-VSOCK-NOTES.md): a backend living
in the daemon's event loop would take every pod's vsock with it. One process serves every VM
(this one costs ~7 MB PSS; one per VM would cost that per pod). The daemon reaches a
guest as any hybrid-vsock client does (`CONNECT <port>` on `<vm_dir>/vsock.sock`), so a
restarted daemon simply connects again.

    python -m host_sandboxer.vsock.serve CONTROL_SOCKET

The daemon starts it lean (vmm/node_helper.py, lean_python.py): `python -I -S`, on
reactor.py, importing the stdlib and host_sandboxer.vsock only.

Control socket (created 0600), one request line and one answer line per connection:
    ADD <vm_dir>     serve <vm_dir>/vhost-vsock.sock (QEMU) and <vm_dir>/vsock.sock -> OK | ERR <why>
                     (anew, if it was served already)
    REMOVE <vm_dir>  stop serving it, remove its sockets                           -> OK <VMs left>
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

from host_sandboxer.private_socket import listen_unix

from .hybrid_sockets import HybridSockets
from .reactor import Reactor

log = logging.getLogger("host_sandboxer.vsock.serve")

MAX_REQUEST = 4096
USAGE = "usage: python -m host_sandboxer.vsock.serve CONTROL_SOCKET"

class Backends:
    """Every VM's HybridSockets and the daemon's control connections, on one Reactor.

    Answers are a line (a LIST of a thousand VMs is ~60 kB): each is sent whole into the fresh
    connection's socket buffer without waiting; a daemon that does not read loses its answer
    (logged), it never stalls the loop that carries every VM's vsock."""

    def __init__(self, loop: Reactor):
        self.loop = loop
        self.vms: dict[str, HybridSockets] = {}
        self.watchers: set[socket.socket] = set()
        self._requests: dict[socket.socket, bytes] = {}   # the request line so far

    def accept(self, listener: socket.socket) -> None:
        try:
            sock = listener.accept()[0]
        except OSError as e:  # BlockingIOError: another wakeup took it; EMFILE & co: logged
            if not isinstance(e, BlockingIOError):
                log.error("control socket: accept failed: %s", e)
            return
        sock.setblocking(False)
        self._requests[sock] = b""
        self.loop.add_reader(sock.fileno(), self._on_request, sock)

    def _on_request(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(MAX_REQUEST)
        except BlockingIOError:
            return
        except OSError as e:
            data = b""
            log.info("control connection: %s", e)
        line = self._requests[sock] + data
        if data and b"\n" not in line and len(line) < MAX_REQUEST:
            self._requests[sock] = line
            return
        del self._requests[sock]
        self.loop.remove_reader(sock.fileno())
        command, _, vm_dir = line.partition(b"\n")[0][:MAX_REQUEST].decode(errors="replace").partition(" ")
        if command == "WATCH":
            self.watchers.add(sock)
            self.loop.add_reader(sock.fileno(), self._on_watcher_readable, sock)
            return
        try:
            sock.sendall((self._answer(command, vm_dir) + "\n").encode())
        except OSError as e:
            log.info("control connection: answer to %s lost: %s", command, e)
        sock.close()

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

    def _answer(self, command: str, vm_dir: str) -> str:
        if command == "LIST":
            return "OK " + "\t".join(self.vms)
        if not os.path.isabs(vm_dir) or any(c in vm_dir for c in "\t\n\0"):
            return f"ERR bad VM directory {vm_dir!r}"
        if command == "ADD":
            return self._add(vm_dir)
        if command == "REMOVE":
            sockets = self.vms.pop(vm_dir, None)
            if sockets is not None:
                sockets.close()
            return f"OK {len(self.vms)}"
        return f"ERR unknown request {command!r}"

    def _add(self, vm_dir: str) -> str:
        old = self.vms.pop(vm_dir, None)
        if old is not None:  # a VM the daemon never finished starting: a new QEMU comes instead
            old.close()
        sockets = HybridSockets(self.loop, os.path.join(vm_dir, "vhost-vsock.sock"),
                                os.path.join(vm_dir, "vsock.sock"),
                                on_dead=lambda reason: self.loop.call_soon(self._gone, vm_dir, sockets, reason))
        try:
            sockets.start()
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


def serve(control_socket: str) -> None:
    """Serve until SIGTERM/SIGINT."""
    loop = Reactor()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loop.stop)
    backends = Backends(loop)
    listener = listen_unix(control_socket, 64)
    listener.setblocking(False)
    loop.add_reader(listener.fileno(), backends.accept, listener)
    try:
        loop.run()
    finally:
        listener.close()
        backends.close()
        if os.path.exists(control_socket):
            os.unlink(control_socket)
        loop.close()


def main(argv=None) -> int:
    """One argument, the control socket (no argparse: ~0.3 MB of the process's heap)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s vsock-backend: %(message)s")
    serve(argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
