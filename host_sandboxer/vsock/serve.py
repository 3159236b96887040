"""One VM's hybrid vsock backend as a process of its own, so the VM's vsock outlives the daemon.

QEMU 7.2 cannot reconnect a vhost-user-vsock device (HYBRID-VSOCK-NOTES.md): a backend living
in the daemon's event loop would take every pod's vsock with it when the daemon restarts. Run
as `python -m host_sandboxer.vsock.serve VHOST_SOCKET UDS_PATH`, it serves QEMU on
VHOST_SOCKET and hybrid-vsock clients on UDS_PATH (the daemon is one: it sends `CONNECT <port>`
like any other, so a restarted daemon simply connects again). It exits when the link is gone
(QEMU disconnected, or a malformed ring reset the device) or on SIGTERM, removing its sockets.
The daemon starts and supervises it (host_sandboxer/vmm/vsock_backend.py).
"""

import argparse
import asyncio
import logging
import signal
import sys

from .hybrid import DEFAULT_GUEST_CID, HybridVsock

log = logging.getLogger("host_sandboxer.vsock.serve")


async def serve(vhost_socket: str, uds_path: str, guest_cid: int) -> str:
    """Serve until the link is gone or SIGTERM/SIGINT; returns why it ended."""
    vsock = HybridVsock(vhost_socket, uds_path, guest_cid)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await vsock.start()
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({vsock.dead, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    reason = vsock.dead.result() if vsock.dead.done() else "stopped by a signal"
    await vsock.close()
    return reason


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m host_sandboxer.vsock.serve", description=__doc__.split("\n")[0])
    parser.add_argument("vhost_socket", help="the vhost-user socket QEMU connects to")
    parser.add_argument("uds_path", help="the hybrid vsock socket clients connect to (CONNECT <port>)")
    parser.add_argument("--cid", type=int, default=DEFAULT_GUEST_CID, help="the guest's CID")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s vsock-backend: %(message)s")
    reason = asyncio.run(serve(args.vhost_socket, args.uds_path, args.cid))
    log.info("%s: %s", args.uds_path, reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
