"""Helper processes of a VM (QEMU, virtiofsd, the hybrid vsock backend): spawned, adopted after
a daemon restart, stopped in steps.

No Python runs between fork and exec (no preexec function): in the daemon gRPC's threads are
busy, and a forked copy of them crashed children (14 of 60 spawns). A helper runs in its own
session (a terminal's Ctrl-C reaches only us; we decide how to stop it). What confines it (its
cgroup, user, capabilities) is set by a wrapper between fork and exec (containment/launch.py).
A pod's helpers outlive the daemon, so a restarted daemon finds them running; throwaway VMs
(`vmm-sandboxer check`, tests) ask `die_with_us`: util-linux's setpriv sets PR_SET_PDEATHSIG and
execs the helper, so a crashed run leaves no QEMU behind. Its stdout and stderr go through a
pipe into a capped log (helper_output.py) whose tail is quoted when it fails.

A helper started by an earlier daemon is not our child: `adopt()` watches it through a pidfd
(its exit status is then unknown) after checking its start time, so a recycled pid is never
mistaken for it.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import signal
from pathlib import Path
from typing import Mapping, Sequence

from host_sandboxer.containment.launch import Confinement, wrap
from host_sandboxer.vmm.helper_output import HelperOutput

UNKNOWN_STATUS = 255  # the exit status of an adopted helper: only its parent (init) learns it


async def spawn(argv: list[str], output: HelperOutput, pass_fds: Sequence[int] = (),
                confinement: Confinement = Confinement(),
                env: Mapping[str, str] | None = None) -> asyncio.subprocess.Process:
    """Start argv, confined, with stdin from /dev/null and stdout+stderr into `output`; the fds
    in `pass_fds` are inherited at the same numbers (every other fd is closed); `env`: set in
    its environment on top of ours. A missing binary is OSError here, as without the wrapper."""
    command = wrap(argv, confinement)
    if len(command) > len(argv) and shutil.which(argv[0]) is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), argv[0])
    child_end = output.child_end()
    try:
        return await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stdout=child_end,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True, pass_fds=tuple(pass_fds),
            env={**os.environ, **env} if env else None)
    finally:
        os.close(child_end)  # the child has it: EOF comes when the helper (and its children) end


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, /proc/PID/stat fields 14-15) the process has used so far, None
    if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def identity(proc) -> dict:
    """What a state file keeps of a helper to adopt it later."""
    return {"pid": proc.pid, "start_time": start_time(proc.pid)}


class AdoptedProcess:
    """A helper left running by an earlier daemon: the face of asyncio.subprocess.Process that
    `stop()` and the watchers use (pid, returncode, wait, terminate, kill)."""

    def __init__(self, pid: int, pidfd: int):
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = pidfd
        self._exited = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(pidfd, self._on_exit)

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        self.returncode = UNKNOWN_STATUS
        self._exited.set_result(UNKNOWN_STATUS)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            signal.pidfd_send_signal(self._pidfd, sig)  # never a recycled pid: the fd pins ours

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def adopt(record: dict | None, output: HelperOutput | None = None) -> AdoptedProcess | None:
    """The helper an `identity()` record names, if that very process still runs; else None.
    `output`: read its stdout pipe again from now on."""
    if not record or not record.get("pid"):
        return None
    try:
        pidfd = os.pidfd_open(record["pid"])
    except OSError:
        return None
    # Compared after the pidfd pins the process: a pid reused before this point is seen here.
    if start_time(record["pid"]) != record.get("start_time"):
        os.close(pidfd)
        return None
    if output is not None:
        output.reattach(record["pid"])
    return AdoptedProcess(record["pid"], pidfd)


def stopped(pid: int) -> list[int]:
    """`pid` and its descendants that are stopped (state T: SIGSTOP and the like)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(child) for child in f.read().split()]
    except (OSError, IndexError, ValueError):
        return []
    return ([pid] if state in ("T", "t") else []) + [p for child in children for p in stopped(child)]


def kill_strays(directory: Path) -> list[int]:
    """SIGKILL every process whose command line names a path inside `directory` (a VM's helpers
    all do: their sockets live there) and return their pids. For helpers no record names: a
    daemon that died while starting a VM."""
    marker = os.fsencode(directory) + b"/"
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if any(marker in arg for arg in args):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
    return killed


async def stop(proc, grace_s: float = 3.0) -> int:
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


def describe_end(proc) -> str:
    """How a finished helper ended, in words; an adopted one's status is not ours to know."""
    if isinstance(proc, AdoptedProcess):
        return "ended (exit status unknown: it was started by an earlier daemon)"
    return describe_exit(proc.returncode)
