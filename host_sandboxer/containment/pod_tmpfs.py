"""The pod's `mounts/` is a tmpfs of its own, bounded in size and inodes.

What the guest can write on the host through the shared directory and is not a volume or a
rootfs (those are the user's and containerd's, as with runc) is under `mounts/`: each
container's bundle directory, bound writable once the host has prepared it (the agent may
rewrite config.json there), and so whatever a guest root creates next to it. On the --dir
filesystem (the README puts it on /run, a tmpfs shared with containerd and every pod's state)
a guest could fill that filesystem, and a Delete walked every file the guest had made (200k
files: 0.77 s of the daemon's loop). On a tmpfs of the pod's own, a guest gets ENOSPC in its
own area; what it writes is charged to the memory cgroup of the writer, virtiofsd (or QEMU for
9p), i.e. the pod's; its removal walks at most `inodes` files, and an unmount frees it all.
The host's own files there (bundle directories, config.json, mount points) are small: the
defaults leave room for hundreds of containers.

nosuid, nodev, noexec: nothing the guest writes there is a device, a setuid program or a
program for the host. The mounts made below (rootfs overlays, volumes) keep their own flags.
"""
from __future__ import annotations

from pathlib import Path

from host_sandboxer.taskproxy.mounts import MountError, is_mountpoint
from vmm_common.mount import MS_NODEV, MS_NOEXEC, MS_NOSUID, mount


def mount_pod_tmpfs(path: Path, size_mib: int, inodes: int) -> None:
    """A bounded tmpfs on `path` (idempotent: a restarted Start finds it mounted)."""
    if is_mountpoint(path):
        return
    try:
        mount("tmpfs", str(path), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
              f"size={size_mib}m,nr_inodes={inodes},mode=0700")
    except OSError as exc:
        raise MountError(exc.errno, f"tmpfs on {path}: {exc.strerror}") from None
