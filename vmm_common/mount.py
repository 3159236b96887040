"""mount(2) and umount2(2), which Python 3.11's os module lacks, for the agent and the host.

Through ctypes on the already-loaded libc (no extra library in the guest image; libc is
opened on first use). Errors raise OSError with the errno and the arguments that failed, so a
log line says which path went wrong. Guest-safe: stdlib only, imported by PID 1 at boot.
"""

import ctypes
import os

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MNT_DETACH = 0x2

_libc = None


def call_libc(name: str, what: str, *args) -> int:
    """libc `name`(*args); on failure OSError naming `what` was attempted."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    result = getattr(_libc, name)(*args)
    if result == -1:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name} {what}: {os.strerror(errno)}")
    return result


def _c(text):
    return None if text is None else os.fsencode(text)


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    what = f"{fstype or 'bind'} {source} on {target} flags={flags:#x} data={data!r}"
    call_libc("mount", what, _c(source), _c(target), _c(fstype), ctypes.c_ulong(flags), _c(data))


def umount(target: str, flags: int = 0) -> None:
    call_libc("umount2", target, _c(target), ctypes.c_int(flags))
