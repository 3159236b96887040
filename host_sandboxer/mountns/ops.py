"""What is done inside the pods' mount namespace (by worker.py, or in-process for `Here`): the
pod's directories, a container's bundle, and their removal. Arguments and results are JSON
values; mounts arrive as fds of detached mounts (taskproxy/mounts.py `detached`)."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from host_sandboxer.containment.pod_tmpfs import mount_pod_tmpfs
from host_sandboxer.taskproxy import mounts


def pod_setup(mounts_dir: str, shared_dir: str, tmpfs_size_mib: int, tmpfs_inodes: int) -> None:
    """The pod's `mounts/` (its tmpfs, shared propagation) and `shared/`, its read-only view."""
    for directory in (mounts_dir, shared_dir):
        os.makedirs(directory, mode=0o700, exist_ok=True)
    mount_pod_tmpfs(Path(mounts_dir), tmpfs_size_mib, tmpfs_inodes)
    mounts.make_shared_mountpoint(Path(mounts_dir))
    mounts.export_readonly(Path(mounts_dir), Path(shared_dir))


def prepare_bundle(host_dir: str, attach: list[list], config: str) -> None:
    """Make `host_dir`: each mount [fd, target, is a directory] attached in order (the rootfs
    first, its mounts stacked), config.json written, then the bundle bound onto itself writable
    (the guest may now write in it). That bind is what `shared/` shows of the bundle: a slave,
    so what the host mounts later under an `rslave` volume arrives there too (a private copy
    kept the volume as it was at Create; the new mount reached only what the bind covers).
    EEXIST if it exists; removed again if anything fails."""
    bundle = Path(host_dir)
    try:
        bundle.mkdir(mode=0o700)
    except FileExistsError:
        raise mounts.MountError(errno.EEXIST, f"{bundle} already exists") from None
    try:
        for fd, target, directory in attach:
            mounts.attach(fd, Path(target), directory)
        temporary = bundle / ".config.json.tmp"
        temporary.write_text(config)
        os.replace(temporary, bundle / "config.json")
        mounts.bind(host_dir, bundle, recursive=True, receive=True)
    except BaseException:
        remove_bundle(host_dir)
        raise


def remove_bundle(host_dir: str) -> list[str]:
    """Unmount everything under the bundle, then remove it (never through a live mount); the
    mounts that would not go (then nothing is removed)."""
    if not os.path.exists(host_dir):
        return []
    left = teardown(host_dir)
    if not left:
        shutil.rmtree(host_dir, ignore_errors=True)
    return left


def teardown(directory: str) -> list[str]:
    """Detach every mount at or below `directory`; those still there."""
    mounts.unmount_all_under(Path(directory))
    return mounts.mountpoints_under(Path(directory))


def mountpoints(directory: str) -> list[str]:
    return mounts.mountpoints_under(Path(directory))


OPERATIONS = {f.__name__: f for f in (pod_setup, prepare_bundle, remove_bundle, teardown, mountpoints)}
