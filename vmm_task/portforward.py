"""The guest end of CRI port-forwarding (vmm_common.portforward): on vsock port 1026 the host asks
for a TCP port; the agent connects to it on the guest's loopback (the pod's network namespace:
every container shares the VM's) and relays the bytes.

Imported on the host's first connection (server.serve_when_connected), not at boot. Only the
host (vsock CID 2) is served; in dev mode the listener is a root-only unix socket.
"""

import asyncio
import errno
import logging
import os
import socket

from vmm_common import portforward as protocol
from vmm_common.splice import splice

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0  # the host sends its request line right after connecting
CONNECT_TIMEOUT_S = 5.0   # per address: a full backlog drops SYNs instead of refusing
LOOPBACKS = ("127.0.0.1", "::1")  # what the host's client dialled ("localhost"), v4 first as CRI does


async def serve(listener: socket.socket) -> None:
    """Accept host connections on `listener` for ever; each is relayed on a task of its own."""
    loop = asyncio.get_running_loop()
    relays: set[asyncio.Task] = set()
    try:
        while True:
            conn, peer = await loop.sock_accept(listener)
            if not _from_host(listener.family, peer):
                log.warning("port-forward: connection from vsock CID %s refused (host only)", peer[0])
                conn.close()
                continue
            task = loop.create_task(_relay(conn))
            relays.add(task)
            task.add_done_callback(relays.discard)
    finally:
        for task in relays:
            task.cancel()


def _from_host(family: int, peer) -> bool:
    return family != socket.AF_VSOCK or peer[0] == socket.VMADDR_CID_HOST


async def _relay(conn: socket.socket) -> None:
    conn.setblocking(False)
    host = await asyncio.open_connection(sock=conn)
    try:
        line = await asyncio.wait_for(host[0].readline(), REQUEST_TIMEOUT_S)
        port = protocol.parse_request(line)
    except (ValueError, asyncio.TimeoutError, OSError) as e:  # ValueError: no newline in 64 KiB
        log.warning("port-forward: bad request from the host: %s", str(e) or "no request in time")
        host[1].close()
        return
    try:
        target = await _connect(port)
    except OSError as e:
        log.info("port-forward to port %d: %s", port, e)
        host[1].write(protocol.refusal(e.strerror or str(e)))
        host[1].close()
        return
    host[1].write(protocol.OK)
    await splice(host, target)


async def _connect(port: int):
    """(reader, writer) to `port` on 127.0.0.1, else [::1]; OSError naming both failures."""
    failures = []
    for address in LOOPBACKS:
        try:
            return await asyncio.wait_for(asyncio.open_connection(address, port), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            failures.append(f"{address}: no answer in {CONNECT_TIMEOUT_S:g} s")
        except OSError as e:
            failures.append(f"{address}: {os.strerror(e.errno) if e.errno else e}")
    raise OSError(errno.ECONNREFUSED, f"port {port}: " + "; ".join(failures))
