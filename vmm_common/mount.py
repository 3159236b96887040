"""mount(2) and umount2(2), which Python 3.11's os module lacks, for the agent and the host;
and the new mount API's open_tree(2), mount_setattr(2) and move_mount(2) (glibc 2.36+,
Debian 12's; Linux 5.12+ for mount_setattr).

Through ctypes on the already-loaded libc (no extra library in the guest image; libc is
opened on first use). Errors raise OSError with the errno and the arguments that failed, so a
log line says which path went wrong. Guest-safe: stdlib only, imported by PID 1 at boot.
"""

import ctypes
import os
from errno import ENOSYS

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

# The new mount API (include/uapi/linux/mount.h, fcntl.h)
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
_SINCE = {"open_tree": "glibc 2.36, Linux 5.2", "move_mount": "glibc 2.36, Linux 5.2",
          "mount_setattr": "glibc 2.36, Linux 5.12"}


class _MountAttr(ctypes.Structure):
    """struct mount_attr (MOUNT_ATTR_SIZE_VER0)."""
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


_libc = None


def _function(name: str, what: str):
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    try:
        return getattr(_libc, name)
    except AttributeError:
        raise OSError(ENOSYS, f"{name} {what}: this libc has no {name} "
                              f"(needs {_SINCE.get(name, 'a newer libc')})") from None


def call_libc(name: str, what: str, *args) -> int:
    """libc `name`(*args); on failure OSError naming `what` was attempted."""
    result = _function(name, what)(*args)
    if result == -1:
        errno = ctypes.get_errno()
        hint = f" (needs {_SINCE[name]})" if errno == ENOSYS and name in _SINCE else ""
        raise OSError(errno, f"{name} {what}: {os.strerror(errno)}{hint}")
    return result


def _c(text):
    return None if text is None else os.fsencode(text)


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    what = f"{fstype or 'bind'} {source} on {target} flags={flags:#x} data={data!r}"
    call_libc("mount", what, _c(source), _c(target), _c(fstype), ctypes.c_ulong(flags), _c(data))


def umount(target: str, flags: int = 0) -> None:
    call_libc("umount2", target, _c(target), ctypes.c_int(flags))


def open_tree(path: str, flags: int) -> int:
    """A file descriptor of the mount at `path`, or with OPEN_TREE_CLONE of a detached copy of
    it (AT_RECURSIVE: with its submounts) that no namespace sees until move_mount()."""
    return call_libc("open_tree", f"{path} flags={flags:#x}", ctypes.c_int(AT_FDCWD), _c(path),
                     ctypes.c_uint(flags))


def mount_setattr(fd: int, attr_set: int, recursive: bool, propagation: int = 0) -> None:
    """Set mount attributes (MOUNT_ATTR_*) and optionally the propagation (MS_PRIVATE, ...) of
    the mount open as `fd`, and with `recursive` of every mount below it."""
    attr = _MountAttr(attr_set=attr_set, propagation=propagation)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    call_libc("mount_setattr", f"fd {fd} set={attr_set:#x} propagation={propagation:#x} flags={flags:#x}",
              ctypes.c_int(fd), b"", ctypes.c_uint(flags), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))


def move_mount(fd: int, target: str) -> None:
    """Attach the (detached) mount open as `fd` at `target`."""
    call_libc("move_mount", f"fd {fd} to {target}", ctypes.c_int(fd), b"", ctypes.c_int(AT_FDCWD), _c(target),
              ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH))


# fsopen(2), fsconfig(2), fsmount(2): a new filesystem as a detached mount (Linux 5.2).
FSOPEN_CLOEXEC = 0x1
FSMOUNT_CLOEXEC = 0x1
FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 0, 1, 6
MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC = 0x2, 0x4, 0x8
_SINCE.update({"fsopen": "glibc 2.36, Linux 5.2", "fsconfig": "glibc 2.36, Linux 5.2",
               "fsmount": "glibc 2.36, Linux 5.2"})


def new_filesystem(fstype: str, source: str | None, options, attr_flags: int) -> int:
    """A detached mount of a new `fstype` filesystem (`options`: "key=value" or "flag" strings,
    as mount(8)'s data), with MOUNT_ATTR_* `attr_flags`; like open_tree's clone, no namespace
    sees it until move_mount()."""
    what = f"{fstype} {source}"
    context = call_libc("fsopen", what, _c(fstype), ctypes.c_uint(FSOPEN_CLOEXEC))
    try:
        settings = ([("source", source)] if source else []) + [tuple(o.split("=", 1)) for o in options]
        for setting in settings:
            key, value = setting[0], (setting[1] if len(setting) > 1 else None)
            command = FSCONFIG_SET_FLAG if value is None else FSCONFIG_SET_STRING
            call_libc("fsconfig", f"{what}: {'='.join(setting)}", ctypes.c_int(context), ctypes.c_uint(command),
                      _c(key), _c(value), ctypes.c_int(0))
        call_libc("fsconfig", f"{what}: create", ctypes.c_int(context), ctypes.c_uint(FSCONFIG_CMD_CREATE),
                  None, None, ctypes.c_int(0))
        return call_libc("fsmount", what, ctypes.c_int(context), ctypes.c_uint(FSMOUNT_CLOEXEC),
                         ctypes.c_uint(attr_flags))
    finally:
        os.close(context)


CLONE_NEWNS = 0x20000


def setns(fd: int, nstype: int) -> None:
    """Join the namespace open as `fd` (a mount namespace: only a single-threaded process may)."""
    call_libc("setns", f"fd {fd} type={nstype:#x}", ctypes.c_int(fd), ctypes.c_int(nstype))
