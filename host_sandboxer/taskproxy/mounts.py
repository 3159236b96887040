"""Host mounts that put a container's rootfs and bind sources into the pod's shared directory.

containerd hands the runtime mounts described for a host (an `overlay` with host lower/upper/
work dirs, or a `bind`); the guest can only see the shared directory. So the host performs
those mounts in a host-only directory, a shared-propagation mount point, shown to the guest
through a read-only slave bind (`export_readonly`): mounts made after virtiofsd started still
reach virtiofsd's mount namespace, and the guest cannot write what the host prepares.
A bind is made as a detached copy of its source, made ready, then attached (`bind`):
propagation copies a mount as it is when it is attached (a later remount would change only
the copy it is made on, leaving the guest's views writable), and a copy that stayed a peer of
its source would pass our unmounts back to the host's own mounts.
A mount is made as a detached mount (`detached`: open_tree's clone, or fsopen/fsmount) where
its source is seen, and attached (`attach`) where it goes: in the daemon these are two
processes, the daemon (the host's view) and a worker in the pods' mount namespace
(host_sandboxer/mountns). mount(2) and the new mount API are called through libc
(vmm_common.mount).
"""

import errno
import os
from pathlib import Path

from vmm_common.mount import (
    AT_RECURSIVE, MNT_DETACH, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY,
    MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_RDONLY, MS_REC, MS_REMOUNT, MS_SHARED,
    MS_SLAVE, OPEN_TREE_CLOEXEC, OPEN_TREE_CLONE, mount, mount_setattr, move_mount, new_filesystem,
    open_tree, umount,
)

# "rro": recursively read-only (runc's and crun's option; containerd's CRI writes it for
# recursiveReadOnly). A new filesystem has no submounts: there it is just "ro".
_FLAG_OPTIONS = {
    "ro": MS_RDONLY, "rro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
    "bind": MS_BIND, "rbind": MS_BIND | MS_REC,
}
# How a bind may be written: the top read-only and submounts as they are (OCI's "ro", as runc
# does it), or every mount of it read-only.
READ_WRITE, READ_ONLY, RECURSIVE_READ_ONLY = "rw", "ro", "rro"
# Propagation options asking for the host's later mounts under the source (CRI's
# HostToContainer is rslave; Bidirectional, rshared, cannot reach back across a VM).
_RECEIVING = {"slave", "rslave", "shared", "rshared"}
# Options that only say what a flag's absence already means, or propagation, which we set.
_IGNORED_OPTIONS = {"rw", "suid", "dev", "exec", "private", "rprivate", "slave", "rslave",
                    "shared", "rshared", "relatime", "norelatime"}


class MountError(OSError):
    """A mount or unmount failed; the message names the paths."""


def _call_mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    try:
        mount(source, target, fstype, flags, data or None)
    except OSError as exc:
        raise MountError(exc.errno, exc.strerror) from None


def split_options(options) -> tuple[int, str]:
    """mount(8)-style options → (flags, data string for the filesystem)."""
    flags, data = 0, []
    for option in options:
        if option in _FLAG_OPTIONS:
            flags |= _FLAG_OPTIONS[option]
        elif option not in _IGNORED_OPTIONS:
            data.append(option)
    return flags, ",".join(data)


def access_of(options) -> str:
    """READ_WRITE, READ_ONLY or RECURSIVE_READ_ONLY: what a bind with these options allows."""
    if RECURSIVE_READ_ONLY in options:
        return RECURSIVE_READ_ONLY
    return READ_ONLY if READ_ONLY in options else READ_WRITE


def is_bind(fstype: str, options) -> bool:
    return fstype == "bind" or bool(split_options(options)[0] & MS_BIND)


def detached(fstype: str, source: str, options) -> int:
    """One containerd mount (`overlay`, `bind`, another filesystem) as a detached mount (an fd
    for `attach`), made in this process's view of the host: attached elsewhere (the pods' mount
    namespace: host_sandboxer/mountns), it shows what the source is here."""
    flags, data = split_options(options)
    if is_bind(fstype, options):
        return clone(source, recursive=bool(flags & MS_REC), access=access_of(options),
                     receive=bool(_RECEIVING.intersection(options)))
    attrs = (MOUNT_ATTR_RDONLY if flags & MS_RDONLY else 0) | (MOUNT_ATTR_NOSUID if flags & MS_NOSUID else 0) \
        | (MOUNT_ATTR_NODEV if flags & MS_NODEV else 0) | (MOUNT_ATTR_NOEXEC if flags & MS_NOEXEC else 0)
    try:
        return new_filesystem(fstype, source, [o for o in data.split(",") if o], attrs)
    except OSError as exc:
        raise MountError(exc.errno, f"{fstype} {source}: {exc.strerror}") from None


def bind(source: str, target: Path, recursive: bool = True, access: str = READ_WRITE,
         receive: bool = False) -> None:
    """Bind `source` on `target` (`clone`, then `attach`), creating `target` as a file or
    directory like the source."""
    fd = clone(source, recursive, access, receive)
    try:
        attach(fd, target, directory=os.path.isdir(source))
    finally:
        os.close(fd)


def clone(source: str, recursive: bool = True, access: str = READ_WRITE, receive: bool = False) -> int:
    """A detached copy of `source` (with its submounts if `recursive`), for `attach`.

    It is made read-only (READ_ONLY: its top; RECURSIVE_READ_ONLY: every mount in it) before it
    is attached, so every copy propagation makes of it (the pod's `shared/`, virtiofsd's mount
    namespace) is as read-only. It is never a peer of the source: private, or with `receive` a
    slave that gets the mounts the host adds under the source later (not for
    RECURSIVE_READ_ONLY: they would arrive writable)."""
    if not os.path.exists(source):
        raise MountError(errno.ENOENT, f"bind source {source} does not exist")
    all_read_only = access == RECURSIVE_READ_ONLY
    try:
        fd = open_tree(source, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | (AT_RECURSIVE if recursive else 0))
        try:
            mount_setattr(fd, MOUNT_ATTR_RDONLY if all_read_only else 0, recursive=True,
                          propagation=MS_SLAVE if receive and not all_read_only else MS_PRIVATE)
            if access == READ_ONLY:
                mount_setattr(fd, MOUNT_ATTR_RDONLY, recursive=False)
        except BaseException:
            os.close(fd)
            raise
        return fd
    except OSError as exc:
        raise MountError(exc.errno, f"bind of {source}: {exc.strerror}") from None


def attach(fd: int, target: Path, directory: bool) -> None:
    """Attach the detached mount `fd` on `target`, made first as a directory or an empty file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        target.mkdir(exist_ok=True)
    elif not target.exists():
        target.touch(mode=0o600)
    try:
        move_mount(fd, str(target))
    except OSError as exc:
        raise MountError(exc.errno, f"mount on {target}: {exc.strerror}") from None


def make_shared_mountpoint(path: Path) -> None:
    """Make `path` a mount point with shared propagation (idempotent)."""
    if not is_mountpoint(path):
        _call_mount(str(path), str(path), None, MS_BIND, None)
    _call_mount("none", str(path), None, MS_SHARED, None)


def export_readonly(source: Path, target: Path) -> None:
    """Show `source` at `target` read-only, including mounts made below `source` later.

    The guest sees `target` (the shared directory). It must not write where the host is still
    preparing a bundle, or race the host by putting a symlink where the host is about to mount:
    so it gets a read-only view (a recursive bind, slave of `source`, read-only at the top).
    Mounts made later under `source` keep their own flags there: a rootfs overlay, or a bundle
    the host has finished and bound writable, stays writable."""
    if is_mountpoint(target):
        return
    _call_mount(str(source), str(target), None, MS_BIND | MS_REC, None)
    _call_mount("none", str(target), None, MS_SLAVE, None)
    _call_mount("none", str(target), None, MS_BIND | MS_REMOUNT | MS_RDONLY, None)


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mountpoints_under(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first (the order to unmount them)."""
    base = os.path.realpath(path)
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point == base or point.startswith(base.rstrip("/") + "/"):
                points.append(point)
    return sorted(points, key=lambda p: p.count("/"), reverse=True)


def submounts_of(path: Path) -> list[str]:
    """The mount points below the mount at `path`, relative to it, parents first."""
    base = os.path.realpath(path)
    return sorted({os.path.relpath(p, base) for p in mountpoints_under(path) if p != base},
                  key=lambda p: (p.count("/"), p))


def is_mountpoint(path: Path) -> bool:
    return os.path.realpath(path) in mountpoints_under(path)


def unmount_all_under(path: Path) -> None:
    """Detach every mount at or below `path`, stacked mounts included. A path reaches only the
    top of a stack, and not what a mount higher up covers (the volumes under a bundle's own
    bind): so passes, each deepest first, until a pass leaves nothing or changes nothing."""
    points = mountpoints_under(path)
    while points:
        for point in points:
            try:
                umount(point, MNT_DETACH)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOENT):
                    raise MountError(exc.errno, exc.strerror) from None
        points, before = mountpoints_under(path), points
        if points == before:
            return
