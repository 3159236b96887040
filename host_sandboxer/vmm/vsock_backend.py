"""Hybrid vsock through the daemon's backend process (host_sandboxer/vsock/serve.py).

`VsockBackend` is the daemon's one backend process: started on the first VM, adopted by a
restarted daemon (its pid and start time are in `<state dir>/vsock-backend.json`), supervised
(if it dies, every VM it served has lost its vsock for good: their `dead` futures resolve),
stopped when its last VM goes. `BackendVsock` is one VM's transport through it, with the face
of the in-process transports (host_sandboxer/vsock/__init__.py): the daemon reaches the guest
as any hybrid-vsock client does (`CONNECT <port>\\n` on `vsock.sock`, `OK <n>\\n` back).

The backend runs as a uid of its own (`[containment] backend_uid`), which may not write the
state directory: the daemon makes its control socket and each VM's two listening sockets (root's,
0600) and hands them over as fds, and removes them.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from pathlib import Path

from host_sandboxer.private_socket import listen_unix
from host_sandboxer.vmm.node_helper import HelperError, NodeHelper
from host_sandboxer.vsock import qemu_args
from host_sandboxer.vsock.hybrid_client import take_answer

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 10.0
CLIENT_BACKLOG = 128  # connections to a VM's vsock.sock waiting for the backend


class VsockBackendError(RuntimeError):
    pass


class VsockBackend:
    def __init__(self, state_dir: Path, user: int | None = None):
        """`user`: the uid and gid the process runs as (None: root, still without capabilities)."""
        self.helper = NodeHelper(state_dir, "vsock-backend", "host_sandboxer.vsock.serve", user=user,
                                 listen_backlog=64)
        self.vms: dict[str, BackendVsock] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()

    @property
    def proc(self):
        return self.helper.proc

    async def add(self, vm: "BackendVsock") -> None:
        async with self._lock:
            await self._ensure_running()
            with listen_unix(str(vm.vhost_socket), 1) as frontend, \
                    listen_unix(str(vm.uds_path), CLIENT_BACKLOG) as clients:
                answer = await self._request(f"ADD {vm.vm_dir}", (frontend.fileno(), clients.fileno()))
            if answer != "OK":
                raise VsockBackendError(f"vsock backend: {answer}")
            self.vms[str(vm.vm_dir)] = vm

    async def adopt(self, vm: "BackendVsock") -> bool:
        """Whether the backend (left by an earlier daemon) still serves `vm`; if so it is ours."""
        async with self._lock:
            if self.proc is None:
                if not self.helper.adopt():
                    return False
                await self._supervise()
            served = (await self._request("LIST"))[len("OK "):].split("\t")
            if str(vm.vm_dir) not in served:
                return False
            self.vms[str(vm.vm_dir)] = vm
            return True

    async def remove(self, vm: "BackendVsock") -> None:
        """Stop serving `vm`; the process ends with its last VM."""
        async with self._lock:
            self.vms.pop(str(vm.vm_dir), None)  # may be gone already: a DEAD notice when QEMU quit
            if not self.helper.alive():
                return
            left = int((await self._request(f"REMOVE {vm.vm_dir}")).split()[1])
            if left == 0 and not self.vms:
                await self.helper.stop()  # a clean end: its log (link losses) told the daemon already

    async def stop_if_idle(self) -> None:
        """After recovery: a backend left serving no VM the daemon knows is stopped."""
        async with self._lock:
            if not self.vms and (self.helper.adopt() or self.proc is not None):
                await self.helper.stop()

    async def _ensure_running(self) -> None:
        if not self.helper.alive():
            await self.helper.ensure_running()
            await self._supervise()

    async def _supervise(self) -> None:
        """Watch the process's exit and its DEAD notices."""
        try:
            sock = await self.helper.connect()
        except HelperError as e:
            raise VsockBackendError(str(e)) from None
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        writer.write(b"WATCH\n")
        self._spawn_task(self._read_notices(reader, writer))
        self._spawn_task(self._watch_exit(self.proc))

    def _spawn_task(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read_notices(self, reader, writer) -> None:
        try:
            while line := await reader.readline():
                vm_dir, _, reason = line.decode(errors="replace").rstrip("\n")[len("DEAD "):].partition("\t")
                vm = self.vms.pop(vm_dir, None)
                if vm is not None:
                    vm.lost(f"the vsock backend dropped the VM's link: {reason}")
        finally:
            writer.close()

    async def _watch_exit(self, proc) -> None:
        await proc.wait()
        if self.vms:
            log.error("%s with %d VM(s) served", self.helper.describe_end(), len(self.vms))
        vms, self.vms = self.vms, {}
        for vm in vms.values():
            vm.lost(self.helper.describe_end())

    async def _request(self, line: str, fds: tuple[int, ...] = ()) -> str:
        """One answer line to `line`, sent with `fds` (SCM_RIGHTS)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, str(self.helper.control))
            socket.send_fds(sock, [line.encode() + b"\n"], fds)  # into a fresh socket's empty buffer
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        try:
            return (await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT_S)).decode().rstrip("\n")
        finally:
            writer.close()


class BackendVsock:
    kind = "hybrid"
    needs_shared_memory = True

    def __init__(self, backend: VsockBackend, vm_dir: Path):
        self.backend = backend
        self.vm_dir = vm_dir
        self.vhost_socket = vm_dir / "vhost-vsock.sock"
        self.uds_path = vm_dir / "vsock.sock"
        self.dead: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def start(self) -> None:
        """The backend serves this VM's sockets from now on (before QEMU starts)."""
        await self.backend.add(self)

    async def adopt(self) -> bool:
        """Take the VM's link over from an earlier daemon; False if it is gone."""
        if await self.backend.adopt(self):
            return True
        self.lost("the vsock backend no longer serves the VM")
        return False

    def record(self) -> dict:
        return {"kind": self.kind}

    def qemu_args(self, fd: int | None = None) -> list:
        return qemu_args(str(self.vhost_socket), fd=fd)

    async def open_socket(self, port: int) -> socket.socket:
        """A socket streaming to guest `port`, the handshake done; ConnectionRefusedError if
        nobody answers."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            loop = asyncio.get_running_loop()
            await loop.sock_connect(sock, str(self.uds_path))
            await loop.sock_sendall(sock, b"CONNECT %d\n" % port)
        except BaseException:
            sock.close()
            raise
        return await asyncio.wait_for(take_answer(sock, port), HANDSHAKE_TIMEOUT_S)

    async def open_connection(self, port: int):
        """(reader, writer) of a stream to guest `port`; ConnectionRefusedError if nobody answers."""
        return await asyncio.open_connection(sock=await self.open_socket(port))

    def lost(self, reason: str) -> None:
        if not self.dead.done():
            self.dead.set_result(reason)

    async def close(self) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError, asyncio.TimeoutError):
            await self.backend.remove(self)
        for path in (self.vhost_socket, self.uds_path):  # ours: the backend may not remove them
            path.unlink(missing_ok=True)
        self.lost("backend closed")
