"""Rootfs mounts of a Create request, mounted onto `<bundle>/rootfs` as the runc shim does, and
unmounted again on Delete. mount(2) through the agent's libc calls (no util-linux in the guest)."""

import errno
import os
from typing import Iterable, NamedTuple

from vmm_task.init import syscalls
from vmm_task.init.syscalls import (MNT_DETACH, MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID,
                                    MS_PRIVATE, MS_RDONLY, MS_REC, MS_REMOUNT, MS_SHARED,
                                    MS_SLAVE)

from .errors import TaskError, invalid_argument

MS_SYNCHRONOUS, MS_MANDLOCK, MS_DIRSYNC = 16, 64, 128
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24

# option -> (clear?, flag), the mount(8) vocabulary containerd's mount package understands
_FLAGS = {
    "ro": (False, MS_RDONLY), "rw": (True, MS_RDONLY),
    "nosuid": (False, MS_NOSUID), "suid": (True, MS_NOSUID),
    "nodev": (False, MS_NODEV), "dev": (True, MS_NODEV),
    "noexec": (False, MS_NOEXEC), "exec": (True, MS_NOEXEC),
    "sync": (False, MS_SYNCHRONOUS), "async": (True, MS_SYNCHRONOUS),
    "dirsync": (False, MS_DIRSYNC), "remount": (False, MS_REMOUNT),
    "mand": (False, MS_MANDLOCK), "nomand": (True, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME), "atime": (True, MS_NOATIME),
    "nodiratime": (False, MS_NODIRATIME), "diratime": (True, MS_NODIRATIME),
    "bind": (False, MS_BIND), "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME), "norelatime": (True, MS_RELATIME),
    "strictatime": (False, MS_STRICTATIME),
    "defaults": (False, 0),
}
_PROPAGATION = {"private": MS_PRIVATE, "rprivate": MS_PRIVATE | MS_REC, "slave": MS_SLAVE,
                "rslave": MS_SLAVE | MS_REC, "shared": MS_SHARED, "rshared": MS_SHARED | MS_REC}

class Mount(NamedTuple):
    type: str
    source: str
    options: tuple


def parse_options(options: Iterable[str]) -> tuple[int, int, str]:
    """(flags, propagation flags, data string) from mount(8)-style options."""
    flags, propagation, data = 0, 0, []
    for option in options:
        if option in _FLAGS:
            clear, flag = _FLAGS[option]
            flags = flags & ~flag if clear else flags | flag
        elif option in _PROPAGATION:
            propagation |= _PROPAGATION[option]
        else:
            data.append(option)
    return flags, propagation, ",".join(data)


def mount(source: str, target: str, fstype: str, options: Iterable[str]) -> None:
    flags, propagation, data = parse_options(options)
    if "\0" in source + target + fstype + data:
        raise invalid_argument(f"mount of {source!r} on {target!r}: NUL byte in the mount fields")
    syscalls.mount(source, target, fstype or None, flags, data or None)
    if flags & MS_BIND and flags & MS_RDONLY:  # a bind mount ignores MS_RDONLY until remounted
        syscalls.mount(None, target, None, flags | MS_REMOUNT)
    if propagation:
        syscalls.mount(None, target, None, propagation)


def unmount(target: str) -> None:
    """Detach `target`; a target that is not mounted is fine."""
    try:
        syscalls.umount(target, MNT_DETACH)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOENT):  # not a mount point, or gone
            raise


def mount_rootfs(mounts: list[Mount], rootfs: str) -> int:
    """Mount each of `mounts` on `rootfs` in order; on failure undo the ones done. Returns the
    number mounted (to unmount as many on Delete)."""
    os.makedirs(rootfs, exist_ok=True)
    done = 0
    try:
        for m in mounts:
            mount(m.source, rootfs, m.type, m.options)
            done += 1
    except OSError as e:
        for _ in range(done):
            unmount(rootfs)
        raise TaskError("UNKNOWN", f"rootfs mount failed: {e.strerror or e}") from e
    return done
