"""One QEMU process: launched from a VmSpec, controlled over QMP (qemu.qmp), watched until it exits.

QEMU serves the QMP and console sockets and starts paused (-S): we connect to both once QMP's
socket appears, then let the guest run, so no console line is lost.  A restarted daemon
`attach()`es to a QEMU left running the same way (QEMU takes the new clients).
`exited` resolves with QEMU's exit status the moment the process ends, for whatever reason;
`failure()` turns that into a message with the exit, the last SHUTDOWN event, QEMU's own
output and the console tail.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from qemu.qmp import ExecuteError, QMPClient, QMPError

from host_sandboxer.containment.launch import Confinement
from host_sandboxer.vmm import process
from host_sandboxer.vmm.cmdline import VmSpec, build_argv, pass_fds
from host_sandboxer.vmm.console import ConsoleLog
from host_sandboxer.vmm.helper_output import HelperOutput
from host_sandboxer.vmm.qemu_fds import connected_unix_socket

log = logging.getLogger(__name__)

# The QMP events kept: how a guest went away. Not RTC_CHANGE and the like, which a guest can
# emit without end (with -no-reboot these few end QEMU, so the record stays small).
WATCHED_EVENTS = ("SHUTDOWN", "POWERDOWN", "RESET", "GUEST_PANICKED")
EXIT_GRACE_S = 1.0


class QemuError(RuntimeError):
    """QEMU failed to start, or died; the message says how and quotes the console tail."""


# One malloc arena: glibc gives each of QEMU's threads (main loop, vCPU, RCU, workers) its own,
# and what a thread frees stays in its arena; measured 0.7-0.8 MB less Pss per QEMU at 10 pods
# (docs/host-memory.md).
QEMU_ENV = {"MALLOC_ARENA_MAX": "1"}


class Qemu:
    def __init__(self, spec: VmSpec, run_dir: Path):
        self.spec = spec
        self.argv = build_argv(spec)
        self.output = HelperOutput(run_dir / "qemu.log")
        self.console = ConsoleLog(run_dir / "console.log", spec.console_socket)
        self.qmp = QMPClient(spec.name)
        # qemu.qmp's default listener queues and keeps every event it accepts for the VM's life.
        self.qmp.events.names = set(WATCHED_EVENTS)
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.started_at = 0.0  # time.monotonic() just before the spawn
        self.proc: asyncio.subprocess.Process | None = None
        self._exit_watch: asyncio.Task | None = None

    async def start(self, confinement: Confinement, timeout_s: float = 10.0, run: bool = True) -> None:
        """Spawn QEMU, confined, and return once the guest runs (`run`; else still paused, e.g.
        to receive a template's state) with QMP and the console connected; raise QemuError
        otherwise."""
        self.started_at = time.monotonic()
        try:
            self.proc = await process.spawn(self.argv, self.output, pass_fds(self.spec), confinement, QEMU_ENV)
        except OSError as e:
            await self.close()
            raise QemuError(f"cannot run {self.argv[0]}: {e.strerror}") from None
        await self._connect("QEMU failed to start", timeout_s, run=run)

    async def attach(self, proc, timeout_s: float = 10.0) -> None:
        """Take over a QEMU left running by an earlier daemon (`proc` from process.adopt())."""
        self.proc = proc
        self.output.reattach(proc.pid)
        await self._connect("cannot reconnect to QEMU", timeout_s, run=False)

    async def _connect(self, what: str, timeout_s: float, run: bool) -> None:
        self._exit_watch = asyncio.create_task(self._watch_exit())
        connect = asyncio.create_task(self._connect_sockets(run))
        await asyncio.wait({connect, self.exited}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if not connect.done() or connect.exception() is not None:
            connect.cancel()
            error = (await asyncio.gather(connect, return_exceptions=True))[0]
            if isinstance(error, Exception):  # e.g. QMP saw EOF: QEMU may be exiting, its status a moment away
                await asyncio.wait({self.exited}, timeout=EXIT_GRACE_S)
            if not self.exited.done():  # QEMU runs but did not answer: its exit is not the story
                if isinstance(error, Exception):
                    what += f" ({type(error).__name__}: {error})"
                await process.stop(self.proc, grace_s=1.0)
            await self._exit_watch
            message = self.failure(what)
            await self.close()
            raise QemuError(message)

    async def _connect_sockets(self, run: bool) -> None:
        await self.qmp.connect(await connected_unix_socket(self.spec.qmp_socket))
        await self.console.connect()
        if run:
            await self.qmp.execute("cont")

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

    async def vcpus(self) -> int:
        """How many vCPUs the VM has (booted and hot-added); QemuError if QMP fails."""
        try:
            return len(await self.qmp.execute("query-cpus-fast"))
        except QMPError as e:
            raise QemuError(f"QMP query-cpus-fast failed: {qmp_error(e)}") from None

    async def add_vcpus(self, count: int) -> None:
        """Hot-add `count` vCPUs into free slots (`-smp N,maxcpus=M`), in slot order; the guest
        still has to online them. QemuError if there are not enough free slots or QEMU refuses."""
        try:
            slots = await self.qmp.execute("query-hotpluggable-cpus")
            free = sorted((slot for slot in slots if "qom-path" not in slot),
                          key=lambda slot: tuple(sorted(slot["props"].items())))
            if len(free) < count:
                raise QemuError(f"{count} more vCPU(s) wanted, {len(free)} slot(s) free (vm.max_cpus)")
            for slot in free[:count]:
                props = slot["props"]
                device_id = "vcpu-" + "-".join(str(props[key]) for key in sorted(props))
                await self.qmp.execute("device_add", {"driver": slot["type"], "id": device_id, **props})
        except QMPError as e:
            raise QemuError(f"QEMU did not add the vCPUs: {qmp_error(e)}") from None

    async def pass_fd(self, name: str, fd: int) -> None:
        """Hand QEMU a copy of `fd` (SCM_RIGHTS on the QMP socket) under `name`, for a later
        command to use (`fd:NAME`, a chardev's fd address, a tap's fd=)."""
        self.qmp.send_fd_scm(fd)
        await self.qmp.execute("getfd", {"fdname": name})

    async def powerdown(self) -> None:
        """ACPI power button; the guest decides what to do with it."""
        await self.qmp.execute("system_powerdown")

    async def quit(self) -> None:
        """Ask QEMU to exit now (the guest gets no say)."""
        await self.qmp.execute("quit")

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) QEMU has used so far: under TCG, the cost of the guest's work."""
        return None if self.proc is None else process.cpu_seconds(self.proc.pid)

    def failure(self, what: str) -> str:
        """`what` plus how QEMU ended, its last SHUTDOWN event, its output and the console tail."""
        parts = [what]
        if self.exited.done():
            parts[0] += f": QEMU {process.describe_end(self.proc)}"
        shutdowns = [e for e in self.events if e["event"] == "SHUTDOWN"]
        if shutdowns:
            data = shutdowns[-1].get("data", {})
            parts[0] += f" after SHUTDOWN (reason={data.get('reason')}, guest={data.get('guest')})"
        qemu_output = self.output.tail()
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
        self.output.close()

    async def _watch_exit(self) -> None:
        status = await self.proc.wait()  # an adopted QEMU: process.UNKNOWN_STATUS
        log.info("%s: QEMU %s", self.spec.name, process.describe_end(self.proc))
        self.exited.set_result(status)


def qmp_error(error: QMPError) -> str:
    """A QMP failure in words: QEMU's own description for a refused command."""
    return str(error) if isinstance(error, ExecuteError) else f"{type(error).__name__}: {error}"  # str: QEMU's desc
