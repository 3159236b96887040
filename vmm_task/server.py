"""Listening sockets and the ttrpc server of the agent.

`listen("vsock://1024")` in the VM, `listen("unix:///PATH")` in dev mode; `build_server(ctx)`
registers every service of `vmm_task.services` on one ttrpc server sharing one AgentContext.
"""

import os
import socket

from vmm_task import peers

VSOCK_PREFIX = "vsock://"
UNIX_PREFIX = "unix://"
LISTEN_BACKLOG = 128  # the host may open many connections at once (Task calls, stdio, events)


class AddressError(ValueError):
    """A listen address that is neither unix:///ABSOLUTE/PATH nor vsock://PORT."""


def listen(address: str) -> socket.socket:
    """A non-blocking listening socket for `address`."""
    if address.startswith(VSOCK_PREFIX):
        port = address[len(VSOCK_PREFIX):]
        if not port.isdigit() or not 0 < int(port) < 2**32:
            raise AddressError(f"bad vsock port in {address!r}")
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.bind((socket.VMADDR_CID_ANY, int(port)))
        except OSError:
            sock.close()
            raise
    elif address.startswith(UNIX_PREFIX):
        path = address[len(UNIX_PREFIX):]
        if not path.startswith("/"):
            raise AddressError(f"unix address needs an absolute path: {address!r}")
        sock = _listen_unix(path)
    else:
        raise AddressError(f"unsupported listen address {address!r} (unix:///PATH or vsock://PORT)")
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def _listen_unix(path: str) -> socket.socket:
    try:
        os.unlink(path)  # a stale socket from a previous run
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is root-only (0600) from the moment it exists
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    return sock


def build_server(ctx):
    """A ttrpc server with every agent service registered against `ctx`."""
    from vmm_common import ttrpc
    from vmm_task.services import register_all

    server = ttrpc.Server()
    register_all(server, ctx)
    return server


def find_runtime(name: str = "") -> str:
    """Path of the OCI runtime: `name` if given, else the first of crun, runc on PATH."""
    return find_program([name] if name else ["crun", "runc"])


def find_program(candidates: list[str]) -> str:
    """Path of the first of `candidates` (absolute paths, or names looked up on PATH) found;
    none found: the first, so that running it fails naming it."""
    for candidate in candidates:
        if candidate.startswith("/"):
            return candidate
        for directory in os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").split(":"):
            path = os.path.join(directory, candidate)
            if os.access(path, os.X_OK):
                return path
    return candidates[0]


async def serve(ctx, listener: socket.socket, t_main: float,
                port_forward: socket.socket | None = None) -> None:
    """Serve every agent service on `listener` until cancelled (on vsock, to the host only:
    vmm_task.peers); prints the ready line. `port_forward`: a listener for the host's
    port-forward streams (vmm_task/portforward.py)."""
    ctx.reaper.start()
    try:
        if port_forward is not None:
            serve_when_connected(ctx, port_forward)
        ttrpc_server = build_server(ctx)
        _settle_gc()
        print(ready_line(t_main), flush=True)
        await ttrpc_server.serve(listener, lambda conn: peers.admitted(conn, "agent"))
    finally:
        for cleanup in reversed(ctx.cleanups):
            cleanup()
        ctx.reaper.stop()


def serve_when_connected(ctx, listener: socket.socket) -> None:
    """Serve port-forwarding on `listener` from the host's first connection on: until then it
    costs one listening socket, its module is imported then (every import is boot time)."""
    import asyncio

    loop = asyncio.get_running_loop()
    fd = listener.fileno()

    def first_connection() -> None:
        loop.remove_reader(fd)
        from vmm_task import portforward
        task = loop.create_task(portforward.serve(listener))
        ctx.cleanups.append(task.cancel)

    loop.add_reader(fd, first_connection)
    ctx.cleanups.append(lambda: loop.remove_reader(fd))


def _settle_gc() -> None:
    """Everything allocated so far (modules, classes, descriptors) lives as long as the agent:
    gc.freeze() keeps it out of every later collection, then collection resumes (PID 1 turned it
    off for the start-up imports, where its dozens of runs found next to nothing to free)."""
    import gc

    gc.freeze()
    gc.enable()


def ready_line(t_main: float) -> str:
    """The one console line the host waits for, with the boot timeline and our RSS:
    started = uptime when the agent was exec'd, main = when our code began, ready = now."""
    import time

    from vmm_task import procfs
    ready = time.clock_gettime(time.CLOCK_BOOTTIME)
    return (f"vmm-task ready: started={procfs.exec_uptime():.3f}s main={t_main:.3f}s "
            f"ready={ready:.3f}s rss={procfs.rss_bytes() / 2**20:.1f}MB pid={os.getpid()}")
