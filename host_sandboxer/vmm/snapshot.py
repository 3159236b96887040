"""A stopped guest saved to a file and restored from it, over QMP (docs/templates.md).

Only device state goes to the file: with x-ignore-shared, RAM in a shared file-backed block (the
guest's RAM file, the pmem root image) stays where it is, and the restoring QEMU must map the
same contents (a copy of the RAM file, the same image). The state file travels as an fd handed
to QEMU (`getfd`), never by path or `exec:`: QEMU may not open the daemon's files, and its
seccomp filter forbids spawning a shell.
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

from qemu.qmp import QMPError

from host_sandboxer.vmm.qemu import Qemu, QemuError, qmp_error

POLL_S = 0.005
STATE_FD = "vmstate"


async def save(qemu: Qemu, state: Path, timeout_s: float = 60.0, ignore_shared: bool = True) -> None:
    """Stop the guest and write its device state to `state` (`ignore_shared=False`: its RAM
    too); QemuError naming QEMU's reason (e.g. a device that cannot migrate) if it fails."""
    await qemu.qmp.execute("stop")
    fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    await _migrate(qemu, "migrate", fd, ignore_shared, "saving the guest")
    await asyncio.wait_for(_migration_done(qemu), timeout_s)


async def restore(qemu: Qemu, state: Path, timeout_s: float = 60.0, ignore_shared: bool = True) -> None:
    """Load `state` into a QEMU started with `-incoming defer` (and still paused), then let the
    guest run. QemuError if QEMU refuses or dies while loading (it ends on a failed load)."""
    fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
    await _migrate(qemu, "migrate-incoming", fd, ignore_shared, "restoring the guest")
    loaded = asyncio.ensure_future(_loaded(qemu))
    try:
        await asyncio.wait({loaded, qemu.exited}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        loaded.cancel()
    if not loaded.done() or loaded.cancelled() or loaded.exception() is not None:
        raise QemuError(qemu.failure("restoring the guest failed" if qemu.exited.done()
                                     else f"the guest's state was not loaded within {timeout_s:g} s"))
    await qemu.qmp.execute("cont")


async def _migrate(qemu: Qemu, command: str, fd: int, ignore_shared: bool, what: str) -> None:
    """`command` (migrate, migrate-incoming) on `fd`, handed to QEMU; ours is closed."""
    try:
        await _ignore_shared(qemu, ignore_shared)
        await qemu.pass_fd(STATE_FD, fd)
        await qemu.qmp.execute(command, {"uri": f"fd:{STATE_FD}"})
    except QMPError as e:
        raise QemuError(f"{what} failed: {qmp_error(e)}") from None
    finally:
        os.close(fd)


async def _ignore_shared(qemu: Qemu, state: bool) -> None:
    await qemu.qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "x-ignore-shared", "state": state}]})


async def _loaded(qemu: Qemu) -> None:
    while await qemu.status() == "inmigrate":
        await asyncio.sleep(POLL_S)


async def _migration_done(qemu: Qemu) -> None:
    while True:
        info = await qemu.qmp.execute("query-migrate")
        if info.get("status") == "completed":
            return
        if info.get("status") in ("failed", "cancelled"):
            raise QemuError(f"saving the guest failed: migration {info['status']}: {info.get('error-desc')}")
        await asyncio.sleep(POLL_S)
