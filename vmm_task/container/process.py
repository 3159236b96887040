"""One process of a container (its init, or an exec) and its state machine, as the runc shim
keeps it: created -> running (<-> paused, init only) -> stopped. The exit is recorded only after
the process's output was drained, so a Wait answer comes after the last byte."""

import asyncio
import logging
import time
from typing import Awaitable, Callable, Optional

log = logging.getLogger(__name__)

CREATED, RUNNING, PAUSED, STOPPED = "created", "running", "paused", "stopped"


class Process:
    def __init__(self, container_id: str, exec_id: str, io: "ProcessIO",  # noqa: F821 (stdio.py)
                 spec: Optional[dict] = None):
        self.container_id = container_id
        self.exec_id = exec_id          # "" for the init process
        self.io = io
        self.spec = spec                # the OCI process of an exec
        self.pid = 0
        self.status = CREATED
        self.exit_code = 0
        self.exited_at = 0              # ns since the epoch; 0 while not exited
        self.reaped = False             # it has exited; `status` says so once output is drained
        self._exited = asyncio.get_running_loop().create_future()
        self._watcher: Optional[asyncio.Task] = None
        # closed while a Start is in flight: its exit is reported after the start was (a
        # process may exit before `crun start` itself returns)
        self.exit_gate = asyncio.Event()
        self.exit_gate.set()

    @property
    def name(self) -> str:
        return f"exec {self.exec_id} of container {self.container_id}" if self.exec_id \
            else f"container {self.container_id}"

    def started(self, pid: int, reaper, on_exit: Callable[["Process"], None],
                after_reap: Optional[Callable[[], Awaitable[None]]] = None) -> None:
        """The runtime reported `pid`: watch for its exit (delivered by the Reaper). `after_reap`
        runs once it is reaped, before the exit is recorded (a Wait answered)."""
        self.pid = pid
        self._watcher = asyncio.ensure_future(self._watch(reaper.wait_pid(pid), on_exit, after_reap))

    async def _watch(self, exit_future: asyncio.Future, on_exit, after_reap) -> None:
        try:
            status = await exit_future
        except ProcessLookupError:
            log.warning("%s: pid %d vanished before it could be watched", self.name, self.pid)
            status = None
        self.reaped = True
        if after_reap is not None:
            try:
                await after_reap()
            except Exception:  # the exit is recorded all the same: a Wait must not hang on it
                log.exception("%s: after its exit", self.name)
        await self.io.drain()
        await self.exit_gate.wait()
        self.set_exited(status.code if status else 255, status.exited_at if status else 0)
        on_exit(self)

    def set_exited(self, code: int, exited_at: int) -> None:
        if self._exited.done():
            return
        self.status = STOPPED
        self.exit_code = code
        self.exited_at = exited_at or time.time_ns()
        self._exited.set_result(None)

    @property
    def exited(self) -> bool:
        return self._exited.done()

    async def wait(self) -> None:
        await asyncio.shield(self._exited)

    def close(self) -> None:
        """Delete: stop watching and release the stdio; a Wait still pending (an exec never
        started) returns rather than hang."""
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()
        self.io.close()
        self.set_exited(255, 0)
