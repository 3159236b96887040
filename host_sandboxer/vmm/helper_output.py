"""A helper process's stdout and stderr: a pipe the daemon reads into a size-capped log.

Not a file the helper appends to: that grows for as long as the helper writes, and what QEMU
and virtiofsd print is partly the guest's doing (error reports about what it did to a
device), so a hostile guest could fill the host's disk. The daemon reads the pipe into a
`CappedLog` (rotated once at its limit). Both ends are non-blocking: a helper never waits for
the daemon (a message written while 64 KiB are unread is lost, not queued), and the daemon reads
a bounded amount per wake-up. While no daemon reads (between a crash and a restart) a write
fails with EPIPE: QEMU ignores SIGPIPE, virtiofsd handles it (a no-op handler) and Python
ignores it, so the helper loses the message and goes on. A restarted daemon reads the same pipe
again through /proc/PID/fd/1 of the helper it adopted.
"""
from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

from host_sandboxer.vmm.capped_log import DEFAULT_LIMIT, CappedLog, read_tail, rotated_path

READ_CHUNK = 65536
CHUNKS_PER_WAKEUP = 16  # a flooding helper cannot hold the daemon's loop for longer than this


class HelperOutput:
    def __init__(self, path: Path, limit: int = DEFAULT_LIMIT):
        self.path = path
        self.limit = limit
        self._log: CappedLog | None = None
        self._fd: int | None = None

    def child_end(self) -> int:
        """A new pipe, read from now on; returns the write end for the child's stdout and
        stderr (non-inheritable: pass it as stdout=; the caller closes it once spawned)."""
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._read_from(read_fd)
        return write_fd

    def reattach(self, pid: int) -> bool:
        """Read an adopted helper's pipe again; False if its stdout is gone or not a pipe
        (e.g. a helper that an older daemon gave a plain file)."""
        try:
            fd = os.open(f"/proc/{pid}/fd/1", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.close(fd)
            return False
        self._read_from(fd)
        return True

    def drain(self) -> None:
        """Move what the pipe holds into the log (at most CHUNKS_PER_WAKEUP reads); at EOF,
        when every writer is gone, stop reading."""
        for _ in range(CHUNKS_PER_WAKEUP):
            if self._fd is None:
                return
            try:
                chunk = os.read(self._fd, READ_CHUNK)
            except BlockingIOError:
                return
            if not chunk:
                self._stop_reading()
                return
            self._log.write(chunk)

    def tail(self, lines: int = 10) -> str:
        """The last lines the helper wrote (what it wrote just before exiting included)."""
        self.drain()
        return "\n".join(read_tail(self.path).decode(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        """Stop reading (the pipe's last unread bytes are taken first); the log stays on disk."""
        self.drain()
        self._stop_reading()
        if self._log is not None:
            self._log.close()
            self._log = None

    def remove(self) -> None:
        """Close, and delete the log and its rotation."""
        self.close()
        for path in (self.path, rotated_path(self.path)):
            path.unlink(missing_ok=True)

    def _read_from(self, fd: int) -> None:
        self._stop_reading()
        if self._log is None:
            self._log = CappedLog(self.path, self.limit)
        self._fd = fd
        asyncio.get_running_loop().add_reader(fd, self.drain)

    def _stop_reading(self) -> None:
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
