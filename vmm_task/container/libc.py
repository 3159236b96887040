"""libc through ctypes for the few calls the stdlib lacks (mount, umount2, inotify). Loaded on
first use from the process's own symbols: no `ctypes.util.find_library`, which runs ldconfig or
a compiler and finds nothing in the guest."""

import ctypes
import os
from typing import Optional

_handle: Optional[ctypes.CDLL] = None


def libc() -> ctypes.CDLL:
    global _handle
    if _handle is None:
        _handle = ctypes.CDLL(None, use_errno=True)
    return _handle


def check(rc: int, what: str) -> int:
    """`rc` when it is not negative, else OSError(errno, "what: strerror")."""
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc
