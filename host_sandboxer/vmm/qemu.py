"""One QEMU process: launched from a VmSpec, controlled over QMP (qemu.qmp), watched until it exits.

We listen on the QMP and console sockets before QEMU starts and QEMU connects to them, so there
is no polling for a socket to appear.  `exited` resolves with QEMU's exit status the moment the
process ends, for whatever reason; `failure()` turns that into a message with the exit, the
last SHUTDOWN event, QEMU's own output and the console tail.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

from qemu.qmp import QMPClient

from host_sandboxer.vmm import process
from host_sandboxer.vmm.cmdline import VmSpec, build_argv, pass_fds
from host_sandboxer.vmm.console import ConsoleLog

log = logging.getLogger(__name__)

# The QMP events kept: how a guest went away. Not RTC_CHANGE and the like, which a guest can
# emit without end (with -no-reboot these few end QEMU, so the record stays small).
WATCHED_EVENTS = ("SHUTDOWN", "POWERDOWN", "RESET", "GUEST_PANICKED")


class QemuError(RuntimeError):
    """QEMU failed to start, or died; the message says how and quotes the console tail."""


class Qemu:
    def __init__(self, spec: VmSpec, run_dir: Path):
        self.spec = spec
        self.argv = build_argv(spec)
        self.output = run_dir / "qemu.log"
        self.console = ConsoleLog(run_dir / "console.log", spec.console_socket)
        self.qmp = QMPClient(spec.name)
        # qemu.qmp's default listener queues and keeps every event it accepts for the VM's life.
        self.qmp.events.names = set(WATCHED_EVENTS)
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.started_at = 0.0  # time.monotonic() just before the spawn
        self.proc: asyncio.subprocess.Process | None = None
        self._exit_watch: asyncio.Task | None = None

    async def start(self, timeout_s: float = 10.0) -> None:
        """Spawn QEMU and return once it has connected to QMP; raise QemuError otherwise."""
        await self.console.listen()
        await self.qmp.start_server(str(self.spec.qmp_socket))
        os.chmod(self.spec.qmp_socket, 0o600)
        self.started_at = time.monotonic()
        try:
            self.proc = await process.spawn(self.argv, self.output, pass_fds(self.spec))
        except OSError as e:
            await self.close()
            raise QemuError(f"cannot run {self.argv[0]}: {e.strerror}") from None
        self._exit_watch = asyncio.create_task(self._watch_exit())
        accept = asyncio.create_task(self.qmp.accept())
        await asyncio.wait({accept, self.exited}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if not accept.done() or accept.exception() is not None:
            accept.cancel()
            await asyncio.gather(accept, return_exceptions=True)
            if not self.exited.done():
                await process.stop(self.proc, grace_s=1.0)
            await self._exit_watch
            message = self.failure("QEMU failed to start")
            await self.close()
            raise QemuError(message)

    @property
    def events(self) -> tuple[dict, ...]:
        """The WATCHED_EVENTS QEMU has sent, in order: {"event", "data", "timestamp"}."""
        return self.qmp.events.history

    @property
    def running(self) -> bool:
        return self.proc is not None and not self.exited.done()

    async def status(self) -> str:
        """The guest run state from QMP query-status ("running", "paused", "shutdown", ...)."""
        return (await self.qmp.execute("query-status"))["status"]

    async def powerdown(self) -> None:
        """ACPI power button; the guest decides what to do with it."""
        await self.qmp.execute("system_powerdown")

    async def quit(self) -> None:
        """Ask QEMU to exit now (the guest gets no say)."""
        await self.qmp.execute("quit")

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) QEMU has used so far: under TCG, the cost of the guest's work."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, AttributeError):
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def failure(self, what: str) -> str:
        """`what` plus how QEMU ended, its last SHUTDOWN event, its output and the console tail."""
        parts = [what]
        if self.exited.done():
            parts[0] += f": QEMU {process.describe_exit(self.exited.result())}"
        shutdowns = [e for e in self.events if e["event"] == "SHUTDOWN"]
        if shutdowns:
            data = shutdowns[-1].get("data", {})
            parts[0] += f" after SHUTDOWN (reason={data.get('reason')}, guest={data.get('guest')})"
        qemu_output = process.output_tail(self.output)
        if qemu_output:
            parts.append("QEMU output:\n" + qemu_output)
        parts.append("console tail:\n" + (self.console.tail() or "(no console output)"))
        return "\n".join(parts)

    async def close(self, grace_s: float = 3.0) -> None:
        """Stop QEMU (QMP quit, then SIGTERM/SIGKILL) and release its sockets; idempotent."""
        if self.running:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.quit(), grace_s)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exited), grace_s)
            await process.stop(self.proc, grace_s)
        if self._exit_watch is not None:
            await self._exit_watch
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        self.spec.qmp_socket.unlink(missing_ok=True)
        await self.console.close()

    async def _watch_exit(self) -> None:
        status = await self.proc.wait()
        log.info("%s: QEMU %s", self.spec.name, process.describe_exit(status))
        self.exited.set_result(status)
