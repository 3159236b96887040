"""The OCI runtime CLI (crun by default, runc selectable), run through the agent's Reaper.

Every call gets `--log FILE --log-format json` so the runtime's own error message can be quoted
back to the caller even when its stderr is the container's stderr (create/exec). The runtime's
state root is private to this agent (`root`), never the host's default /run/crun.
"""

import itertools
import json
import logging
import os
import time
from typing import Optional, Sequence

from .errors import TaskError

log = logging.getLogger(__name__)

StdioFds = tuple[Optional[int], Optional[int], Optional[int]]


class RuntimeFailure(TaskError):
    """The runtime exited non-zero; the message quotes its log."""

    def __init__(self, message: str):
        super().__init__("UNKNOWN", message)


class Runtime:
    """One OCI runtime binary with its own state root."""

    def __init__(self, reaper, binary: str, root: str, no_pivot: bool = False):
        self._reaper = reaper
        self.binary = binary
        self.name = os.path.basename(binary)
        self.root = root
        self._no_pivot = no_pivot
        self._serial = itertools.count()
        os.makedirs(root, mode=0o700, exist_ok=True)

    async def create(self, cid: str, bundle: str, pid_file: str,
                     console_socket: Optional[str], stdio: StdioFds, no_pivot: bool = False,
                     no_new_keyring: bool = False) -> None:
        args = ["--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        if self._no_pivot or no_pivot:
            args.append("--no-pivot")
        if no_new_keyring:
            args.append("--no-new-keyring")
        await self._run("create", cid, args + [cid], stdio)

    async def exec(self, cid: str, process_file: str, pid_file: str,
                   console_socket: Optional[str], stdio: StdioFds) -> None:
        args = ["--process", process_file, "--detach", "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        await self._run("exec", cid, args + [cid], stdio)

    async def start(self, cid: str) -> None:
        await self._run("start", cid, [cid])

    async def kill(self, cid: str, signal: int, all_processes: bool = False) -> None:
        await self._run("kill", cid, (["--all"] if all_processes else []) + [cid, str(signal)])

    async def delete(self, cid: str, force: bool = False) -> None:
        await self._run("delete", cid, (["--force"] if force else []) + [cid])

    async def pause(self, cid: str) -> None:
        await self._run("pause", cid, [cid])

    async def resume(self, cid: str) -> None:
        await self._run("resume", cid, [cid])

    async def update(self, cid: str, resources_file: str) -> None:
        await self._run("update", cid, ["--resources", resources_file, cid])

    async def _run(self, verb: str, cid: str, args: Sequence[str],
                   stdio: StdioFds = (None, None, None)) -> None:
        log_file = os.path.join(self.root, f".log-{os.getpid()}-{next(self._serial)}.json")
        argv = [self.binary, "--root", self.root, "--log", log_file, "--log-format", "json", verb,
                *args]
        started = time.monotonic()
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            stdin, stdout, stderr = (null if fd is None else fd for fd in stdio)
            try:
                child = await self._reaper.spawn(argv, stdin=stdin, stdout=stdout, stderr=stderr)
            except OSError as e:
                raise RuntimeFailure(f"cannot execute {self.binary}: {e}") from e
        finally:
            os.close(null)
        status = await child.wait()
        log.debug("%s %s %s: exit %d in %.1f ms", self.name, verb, cid, status.code,
                  (time.monotonic() - started) * 1000)
        try:
            if status.code != 0:
                raise RuntimeFailure(
                    f"{self.name} {verb} {cid} failed "
                    f"(exit {status.code}): {_log_errors(log_file) or 'no message in its log'}")
        finally:
            _unlink(log_file)


def _log_errors(log_path: str) -> str:
    """What the runtime logged about its failure, oldest first: every error-level message (runc's
    nsexec stages log the cause as "fatal" before the parent's vaguer summary, e.g. "read
    init-p: connection reset by peer"), or else the last message of its JSON log."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    errors, last = [], ""
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            entry = {"level": "error", "msg": line.strip()}
        if not isinstance(entry, dict) or not entry.get("msg"):
            continue
        last = str(entry["msg"])
        if entry.get("level") in _ERROR_LEVELS and last not in errors:
            errors.append(last)
    return "; ".join(errors[-_QUOTED_ERRORS:]) if errors else last


_ERROR_LEVELS = ("error", "fatal", "panic")
_QUOTED_ERRORS = 4


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def root_is_ramfs(mountinfo: str = "/proc/self/mountinfo") -> bool:
    """pivot_root(2) cannot leave an initramfs root: the runtime then needs --no-pivot."""
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if fields[4] == "/":
                    return fields[fields.index("-") + 1] in ("rootfs", "ramfs")
    except OSError:
        pass
    return False
