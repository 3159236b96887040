"""Hybrid vsock through a backend process (host_sandboxer/vsock/serve.py): the daemon's transport.

Same face as the in-process transports (host_sandboxer/vsock/__init__.py), plus `record()` and
`adopt()`: the backend outlives the daemon with its VM, and a restarted daemon takes it over.
The daemon reaches the guest as any hybrid-vsock client does (`CONNECT <port>\\n` on
`vsock.sock`, `OK <n>\\n` back). The backend exits when the link is gone (its QEMU left, or a
malformed ring reset the device); `dead` resolves then, and the VM's vsock cannot come back.
"""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from host_sandboxer.vmm import process
from host_sandboxer.vsock.hybrid import qemu_args

START_TIMEOUT_S = 10.0
HANDSHAKE_TIMEOUT_S = 5.0


class BackendVsock:
    kind = "hybrid"
    needs_shared_memory = True

    def __init__(self, vm_dir: Path):
        self.vhost_socket = vm_dir / "vhost-vsock.sock"
        self.uds_path = vm_dir / "vsock.sock"
        self.output = vm_dir / "vsock-backend.log"
        self.proc = None
        self.dead: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def start(self, die_with_us: bool = False) -> None:
        """Spawn the backend; return once it listens on both sockets (before QEMU starts)."""
        for path in (self.vhost_socket, self.uds_path):
            path.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "host_sandboxer.vsock.serve", str(self.vhost_socket), str(self.uds_path)]
        self.proc = await process.spawn(argv, self.output, die_with_us=die_with_us)
        self._watch()
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
        while not self.uds_path.exists():  # bound after the vhost-user socket listens
            if self.dead.done() or asyncio.get_running_loop().time() > deadline:
                await self.close()
                raise RuntimeError(f"vsock backend did not start: {process.output_tail(self.output)}")
            await asyncio.sleep(0.005)

    def adopt(self, record: dict | None) -> bool:
        """Take over the backend an earlier daemon started; False if it is gone."""
        self.proc = process.adopt(record)
        if self.proc is None:
            self.dead.set_result("the vsock backend process is gone")
            return False
        self._watch()
        return True

    def record(self) -> dict:
        return {"kind": self.kind, **process.identity(self.proc)}

    def qemu_args(self) -> list:
        return qemu_args(str(self.vhost_socket))

    async def open_connection(self, port: int):
        """(reader, writer) of a stream to guest `port`; ConnectionRefusedError if nobody answers."""
        reader, writer = await asyncio.open_unix_connection(str(self.uds_path))
        try:
            writer.write(b"CONNECT %d\n" % port)
            line = await asyncio.wait_for(reader.readline(), HANDSHAKE_TIMEOUT_S)
        except BaseException:
            writer.close()
            raise
        if not line.startswith(b"OK "):
            writer.close()
            raise ConnectionRefusedError(f"vsock port {port}: refused (nothing listening, or the guest is not up)")
        return reader, writer

    async def close(self) -> None:
        """Stop the backend (it also ends by itself when QEMU goes) and remove its sockets."""
        if self.proc is not None:
            await process.stop(self.proc)
        for path in (self.vhost_socket, self.uds_path):
            path.unlink(missing_ok=True)
        if not self.dead.done():
            self.dead.set_result("backend closed")

    def _watch(self) -> None:
        def ended(task: asyncio.Task) -> None:
            if not self.dead.done() and not task.cancelled():
                self.dead.set_result(f"the vsock backend {process.describe_exit(task.result())}: "
                                     f"{process.output_tail(self.output, 3)}")
        asyncio.ensure_future(self.proc.wait()).add_done_callback(ended)
