"""How far one stdio stream of a process got, kept on disk so a restarted daemon resumes it.

A 32-byte file per stream in the pod's `stdio/` directory: the bytes delivered (output: written
into containerd's FIFO), whether the stream is finished, and the identity (pid, start time) of
the process keeping its FIFO open (fifo_keeper.py). It is rewritten in place
(`os.pwrite`) after every write to the FIFO: a daemon killed at any moment loses nothing the
page cache holds, and resumes from the offset of its last complete write (so at most the bytes
of one write may reach the FIFO twice, none may be lost).
"""

import logging
import os
import struct
from pathlib import Path

log = logging.getLogger(__name__)

_RECORD = struct.Struct(">QQQQ")  # delivered bytes, finished (0/1), keeper pid, keeper start time


class DeliveredMark:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(mode=0o700, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        data = os.pread(self._fd, _RECORD.size, 0)
        self.offset, self.finished, self.keeper = 0, False, None
        if len(data) == _RECORD.size:
            self.offset, finished, pid, started = _RECORD.unpack(data)
            self.finished = bool(finished)
            self.keeper = {"pid": pid, "start_time": started} if pid else None
        elif data:
            log.warning("stdio mark %s: %d bytes, not %d; starting from 0", path, len(data), _RECORD.size)

    def advance(self, count: int) -> None:
        self.offset += count
        self._write()

    def finish(self) -> None:
        self.finished = True
        self._write()

    def set_keeper(self, identity: dict | None) -> None:
        """process.identity() of the FIFO's keeper, or None once it is stopped."""
        self.keeper = identity
        self._write()

    def _write(self) -> None:
        pid, started = (self.keeper["pid"], self.keeper["start_time"] or 0) if self.keeper else (0, 0)
        os.pwrite(self._fd, _RECORD.pack(self.offset, self.finished, pid, started), 0)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        """The process is deleted: nothing will resume it."""
        self.close()
        self.path.unlink(missing_ok=True)
