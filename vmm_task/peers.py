"""Who may talk to the agent: on vsock, only the host.

The agent's port 1024 runs any spec as guest root and its stdio ports carry the containers'
streams, so a process inside the guest (a container allowed to open AF_VSOCK) must not reach
them. The guest kernel has no vsock loopback (kernel/fragments/30-vsock.config), and every vsock
listener of the agent also closes, unanswered, a connection whose peer is not the host
(VMADDR_CID_HOST, 2). A unix socket (dev mode) is root-only by its mode: not checked here.
"""

import asyncio
import logging
import socket

log = logging.getLogger(__name__)


def refusal(conn: socket.socket) -> str:
    """Why the accepted `conn` must be closed unanswered ("" if it may be served)."""
    if conn.family != socket.AF_VSOCK:
        return ""
    try:
        cid, port = conn.getpeername()
    except OSError as e:
        return f"vsock peer unknown ({e.strerror or e})"
    if cid != socket.VMADDR_CID_HOST:
        return f"vsock peer cid {cid} port {port} is not the host (cid {socket.VMADDR_CID_HOST})"
    return ""


def admitted(conn: socket.socket, where: str) -> bool:
    """True if `conn` may be served; otherwise it is closed and the refusal logged."""
    why = refusal(conn)
    if not why:
        return True
    log.warning("%s: connection refused: %s", where, why)
    conn.close()
    return False


async def serve_each(listener: socket.socket, where: str, handle) -> None:
    """Accept connections on `listener` for ever, each admitted one handled by `await
    handle(conn)` on a task of its own; those tasks are cancelled with this one."""
    loop = asyncio.get_running_loop()
    handling: set[asyncio.Task] = set()
    try:
        while True:
            conn, _ = await loop.sock_accept(listener)
            if not admitted(conn, where):
                continue
            task = loop.create_task(handle(conn))
            handling.add(task)
            task.add_done_callback(handling.discard)
    finally:
        for task in handling:
            task.cancel()
