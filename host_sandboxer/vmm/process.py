"""Helper processes of a VM (QEMU, virtiofsd): spawned to die with us, stopped in steps.

A helper gets SIGKILL when the thread that spawned it exits (PR_SET_PDEATHSIG), so a crashed
daemon or test run leaves no QEMU behind on a shared machine; it runs in its own session so a
terminal's Ctrl-C reaches only us, and we decide how to stop it.  Its stdout and stderr go to
a file whose tail is quoted when it fails.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
from pathlib import Path
from typing import Sequence

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


async def spawn(argv: list[str], output: Path, pass_fds: Sequence[int] = ()) -> asyncio.subprocess.Process:
    """Start argv with stdin from /dev/null and stdout+stderr appended to `output`; the fds in
    `pass_fds` are inherited at the same numbers (every other fd is closed)."""
    with open(output, "ab") as out:
        os.fchmod(out.fileno(), 0o600)
        return await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent, pass_fds=tuple(pass_fds))


async def stop(proc: asyncio.subprocess.Process, grace_s: float = 3.0) -> int:
    """SIGTERM, then SIGKILL after `grace_s`; returns the exit status (negative: signal)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            return await asyncio.wait_for(proc.wait(), grace_s)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    return await proc.wait()


def describe_exit(status: int) -> str:
    """`status` as returned by Process.returncode, in words."""
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exited with status {status}"


def output_tail(output: Path, lines: int = 10) -> str:
    """The last lines a helper wrote (empty if it wrote nothing)."""
    try:
        with open(output, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 8192))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])
