"""The few Linux system calls Python 3.11's os module lacks: mount, umount2, unshare, reboot.

Through ctypes on the already-loaded libc (no extra library in the image). Errors raise OSError
with the errno and the arguments that failed, so a log line says what went wrong.
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

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

RB_POWER_OFF = 0x4321FEDC

_libc = None


def _call(name: str, what: str, *args) -> int:
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
    what = f"{source} on {target} type {fstype} flags={flags:#x} data={data!r}"
    _call("mount", what, _c(source), _c(target), _c(fstype), ctypes.c_ulong(flags), _c(data))


def umount(target: str, flags: int = 0) -> None:
    _call("umount2", target, _c(target), ctypes.c_int(flags))


def unshare(flags: int) -> None:
    _call("unshare", f"{flags:#x}", ctypes.c_int(flags))


def reboot(command: int) -> None:
    _call("reboot", f"{command:#x}", ctypes.c_int(command))
