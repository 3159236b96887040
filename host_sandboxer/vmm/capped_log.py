"""An append-only log file the daemon writes for something untrusted or chatty (a guest's
console, a helper process's output): at `limit` bytes it rotates once (`X.log` -> `X.log.1`),
so at most twice the limit is ever on disk, and the newest output is always kept."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_LIMIT = 1 << 20


class CappedLog:
    def __init__(self, path: Path, limit: int = DEFAULT_LIMIT):
        self.path = path
        self.limit = limit
        self._file = None
        self._size = 0
        self._open()

    def write(self, chunk: bytes) -> None:
        while chunk:
            if self._size >= self.limit:
                self._file.close()
                os.replace(self.path, rotated_path(self.path))
                self._open()
            part = chunk[:self.limit - self._size]
            self._file.write(part)
            self._size += len(part)
            chunk = chunk[len(part):]

    def close(self) -> None:
        self._file.close()

    def _open(self) -> None:
        self._file = open(self.path, "ab", buffering=0)  # a restarted daemon appends
        os.fchmod(self._file.fileno(), 0o600)
        self._size = os.fstat(self._file.fileno()).st_size


def rotated_path(path: Path) -> Path:
    """Where the CappedLog at `path` keeps its older half."""
    return path.with_name(path.name + ".1")


def read_tail(path: Path, max_bytes: int = 8192) -> bytes:
    """The last `max_bytes` written to a CappedLog at `path`, across its rotation."""
    data = b""
    for part in (path, rotated_path(path)):
        try:
            with open(part, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - (max_bytes - len(data))))
                data = f.read() + data
        except OSError:
            continue
        if len(data) >= max_bytes:
            break
    return data
