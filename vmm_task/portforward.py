"""The guest end of CRI port-forwarding (vmm_common.portforward): on vsock port 1026 the host asks
for a TCP port; the agent connects to it on the guest's loopback (the pod's network namespace:
every container shares the VM's) and relays the bytes.

Imported on the host's first connection (server.serve_when_connected), not at boot. Only the
host (vsock CID 2) is served (vmm_task.peers); in dev mode the listener is a root-only unix
socket.
"""

import asyncio
import errno
import logging
import os
import socket

from vmm_common import portforward as protocol
from vmm_common.fdio import read_line
from vmm_common.splice import splice
from vmm_task import peers

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0  # the host sends its request line right after connecting
CONNECT_TIMEOUT_S = 5.0   # per address: a full backlog drops SYNs instead of refusing
# what the host's client dialled ("localhost"): IPv4 first, as CRI does
LOOPBACKS = ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"))


async def serve(listener: socket.socket) -> None:
    """Accept host connections on `listener` for ever; each is relayed on a task of its own."""
    await peers.serve_each(listener, "port-forward", _relay)


async def _relay(conn: socket.socket) -> None:
    conn.setblocking(False)
    try:
        target = await _open_target(conn)
    except OSError as e:  # the host went away meanwhile
        log.info("port-forward: %s", e)
        target = None
    except BaseException:
        conn.close()
        raise
    if target is None:
        conn.close()
        return
    await splice(conn, target)


async def _open_target(conn: socket.socket) -> socket.socket | None:
    """Read the host's request, connect to the port it names, answer. The connected socket;
    None when it could not be made (the host was answered ERR) or the request was bad (no
    answer: the host closes its client's connection either way)."""
    loop = asyncio.get_running_loop()
    try:
        line = await asyncio.wait_for(read_line(conn, protocol.MAX_LINE), REQUEST_TIMEOUT_S)
        port = protocol.parse_request(line)
    except (protocol.ProtocolError, asyncio.TimeoutError) as e:
        log.warning("port-forward: bad request from the host: %s", str(e) or "no request in time")
        return None
    try:
        target = await _connect(port)
    except OSError as e:
        log.info("port-forward to %s", e.strerror)
        await loop.sock_sendall(conn, protocol.refusal(e.strerror))
        return None
    try:
        await loop.sock_sendall(conn, protocol.OK)
    except BaseException:
        target.close()
        raise
    return target


async def _connect(port: int) -> socket.socket:
    """A socket connected to `port` on 127.0.0.1, else [::1]; OSError naming both failures."""
    loop = asyncio.get_running_loop()
    failures = []
    for family, address in LOOPBACKS:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        except OSError as e:  # no IPv6 in this kernel
            failures.append(f"{address}: {e.strerror}")
            continue
        try:
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, (address, port)), CONNECT_TIMEOUT_S)
            return sock
        except asyncio.TimeoutError:
            failures.append(f"{address}: no answer in {CONNECT_TIMEOUT_S:g} s")
        except OSError as e:
            failures.append(f"{address}: {os.strerror(e.errno) if e.errno else e}")
        except BaseException:
            sock.close()
            raise
        sock.close()
    raise OSError(errno.ECONNREFUSED, f"port {port}: " + "; ".join(failures))
