"""Standard streams on /dev/console.

The kernel opens /dev/console as fds 0-2 of init only when the initrd has that node; otherwise
PID 1 starts with none and every log line would vanish. Once devtmpfs is mounted we fill any
missing standard fd from /dev/console and rebuild Python's streams on top.
"""

import io
import os
import sys

CONSOLE = "/dev/console"


def attach_console(path: str = CONSOLE) -> str | None:
    """Give fds 0-2 to `path` where missing; None on success, else what failed."""
    missing = [fd for fd in (0, 1, 2) if not _fd_open(fd)]
    if not missing:
        return None
    try:
        console = os.open(path, os.O_RDWR | os.O_NOCTTY)
    except OSError as e:
        return f"cannot open {path}: {e}"
    for fd in missing:
        if fd != console:
            os.dup2(console, fd)
    if console > 2:
        os.close(console)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True,
                                  errors="backslashreplace")
    return None


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
