"""The hybrid vsock backends of all of a daemon's VMs, in one process of their own, so that
VMs keep their vsock when the daemon restarts.

QEMU 7.2 cannot reconnect a vhost-user-vsock device (HYBRID-VSOCK-NOTES.md): a backend living
in the daemon's event loop would take every pod's vsock with it. One process serves every VM
(this one costs ~10 MB PSS; one per VM would cost that per pod). The daemon reaches a
guest as any hybrid-vsock client does (`CONNECT <port>` on `<vm_dir>/vsock.sock`), so a
restarted daemon simply connects again.

    python -m host_sandboxer.vsock.serve CONTROL_SOCKET     (the daemon runs `command()`)

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

import asyncio
import contextlib
import logging
import os
import signal
import sys

from .hybrid import HybridVsock

log = logging.getLogger("host_sandboxer.vsock.serve")

MAX_REQUEST = 4096
USAGE = "usage: python -m host_sandboxer.vsock.serve CONTROL_SOCKET"

# The process needs the stdlib and this package only: no site (-S: no site-packages, no .pth
# hooks), and no ssl, which asyncio imports when it can but nothing here speaks TLS. Measured
# idle, argparse gone too: 11.7 -> 10.0 MB PSS (docs/benchmarks.md, "Host memory").
_BOOT = ("import sys; sys.modules['ssl'] = None; sys.path.insert(0, {root!r}); "
         "from host_sandboxer.vsock.serve import main; sys.exit(main(sys.argv[1:]))")


def command(control_socket: str) -> list[str]:
    """The backend process's argv, lean (see _BOOT)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return [sys.executable, "-I", "-S", "-c", _BOOT.format(root=root), control_socket]


class Backends:
    def __init__(self):
        self.vms: dict[str, HybridVsock] = {}
        self.watchers: set[asyncio.StreamWriter] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = (await reader.readline())[:MAX_REQUEST].decode(errors="replace").rstrip("\n")
            command, _, vm_dir = line.partition(" ")
            if command == "WATCH":
                self.watchers.add(writer)
                await reader.read()  # until the daemon goes
                return
            writer.write((await self._answer(command, vm_dir) + "\n").encode())
            await writer.drain()
        except (ConnectionError, ValueError) as e:
            log.info("control connection: %s", e)
        finally:
            self.watchers.discard(writer)
            writer.close()

    async def _answer(self, command: str, vm_dir: str) -> str:
        if command == "LIST":
            return "OK " + "\t".join(self.vms)
        if not os.path.isabs(vm_dir) or any(c in vm_dir for c in "\t\n\0"):
            return f"ERR bad VM directory {vm_dir!r}"
        if command == "ADD":
            return await self._add(vm_dir)
        if command == "REMOVE":
            vsock = self.vms.pop(vm_dir, None)
            if vsock is not None:
                await vsock.close()
            return f"OK {len(self.vms)}"
        return f"ERR unknown request {command!r}"

    async def _add(self, vm_dir: str) -> str:
        old = self.vms.pop(vm_dir, None)
        if old is not None:  # a VM the daemon never finished starting: a new QEMU comes instead
            await old.close()
        vsock = HybridVsock(os.path.join(vm_dir, "vhost-vsock.sock"), os.path.join(vm_dir, "vsock.sock"))
        try:
            await vsock.start()
        except OSError as e:
            await vsock.close()
            return f"ERR {e}"
        self.vms[vm_dir] = vsock
        vsock.dead.add_done_callback(lambda fut: asyncio.ensure_future(self._gone(vm_dir, vsock, fut.result())))
        return "OK"

    async def _gone(self, vm_dir: str, vsock: HybridVsock, reason: str) -> None:
        if self.vms.get(vm_dir) is not vsock:
            return  # REMOVEd: the daemon asked for it
        del self.vms[vm_dir]
        await vsock.close()
        log.info("%s: link gone: %s", vm_dir, reason)
        for watcher in list(self.watchers):
            watcher.write(f"DEAD {vm_dir}\t{reason}\n".encode(errors="replace"))

    async def close(self) -> None:
        for vsock in self.vms.values():
            await vsock.close()
        self.vms.clear()


async def serve(control_socket: str) -> None:
    """Serve until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    backends = Backends()
    old_umask = os.umask(0o177)  # the control socket is 0600 from the start
    try:
        server = await asyncio.start_unix_server(backends.handle, path=control_socket)
    finally:
        os.umask(old_umask)
    await stop.wait()
    server.close()
    await backends.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(control_socket)


def main(argv=None) -> int:
    """One argument, the control socket (no argparse: ~0.3 MB of the process's heap)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s vsock-backend: %(message)s")
    asyncio.run(serve(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
