"""Does the shared directory's server (virtiofsd or QEMU's 9p on the host) still answer?

A server that hangs (stopped, deadlocked) leaves every file access to the containers' rootfs
blocked in the kernel, unseen. The probe is a statfs of the mount: FUSE_STATFS and 9p's
Tstatfs always go to the server (the guest never answers them from its caches). It runs in a
thread, as the call may block for as long as the server does; while one is unanswered no
other starts, so a hung server costs one blocked thread, not one per check.
"""

import asyncio
import contextlib
import os
import threading
import time


class SharefsProbe:
    def __init__(self, path: str):
        self.path = path
        self._pending: asyncio.Future | None = None  # the statfs in flight
        self._since = 0.0  # time.monotonic() when it began

    async def check(self, timeout_s: float) -> str:
        """"" if the server answered a statfs within `timeout_s`; else why not, in words."""
        if self._pending is None:
            loop = asyncio.get_running_loop()
            self._pending = loop.create_future()
            self._since = time.monotonic()
            threading.Thread(target=self._statfs, args=(loop, self._pending), name="sharefs-probe",
                             daemon=True).start()
        try:
            error = await asyncio.wait_for(asyncio.shield(self._pending), timeout_s)
        except asyncio.TimeoutError:
            return (f"the shared directory {self.path} has not answered a statfs for "
                    f"{time.monotonic() - self._since:.0f} s: its server on the host is not serving")
        return f"statfs of the shared directory {self.path} failed: {error}" if error else ""

    def _statfs(self, loop, pending: asyncio.Future) -> None:
        try:
            os.statvfs(self.path)
            error = ""
        except OSError as e:
            error = os.strerror(e.errno) if e.errno else str(e)
        with contextlib.suppress(RuntimeError):  # the agent's loop ended meanwhile
            loop.call_soon_threadsafe(self._answered, pending, error)

    def _answered(self, pending: asyncio.Future, error: str) -> None:
        pending.set_result(error)
        if self._pending is pending:
            self._pending = None
