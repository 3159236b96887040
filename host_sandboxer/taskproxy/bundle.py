"""A container's bundle as the guest sees it: `<pod>/mounts/<container-id>/` on the host.

Holds the rewritten config.json, `rootfs/` (containerd's rootfs mounts performed on the host)
and `mounts/<n>` (the spec's bind sources). The guest finds it at
`/run/kuasar/state/<container-id>` through the shared directory, a read-only view of
`<pod>/mounts/` (see mounts.export_readonly). Both are in the pod's mount space
(host_sandboxer/mountns), not in the daemon's mount namespace.
"""

import errno
import json
import logging
import os
from pathlib import Path

import grpc

from host_sandboxer.mountns.space import Here
from host_sandboxer.taskproxy import mounts
from host_sandboxer.taskproxy.errors import HostError
from host_sandboxer.taskproxy.spec_rewrite import (ROOTFS_DIR, SpecError, drop_missing_pod_files,
                                                   reopen_submounts, rewrite_spec)

log = logging.getLogger(__name__)


def read_host_spec(host_bundle: str) -> dict:
    """containerd's config.json from the host bundle; NOT_FOUND / INVALID_ARGUMENT if unusable."""
    if not host_bundle or not os.path.isabs(host_bundle):
        raise HostError(grpc.StatusCode.INVALID_ARGUMENT, f"bundle {host_bundle!r} is not an absolute path")
    path = os.path.join(host_bundle, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise HostError(grpc.StatusCode.NOT_FOUND, f"bundle {host_bundle}: no config.json") from None
    except (OSError, ValueError) as exc:
        raise HostError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"bundle {host_bundle}: bad config.json: {exc}") from None


class GuestBundle:
    def __init__(self, root: Path, container_id: str, space=None):
        """`space`: where the pod's mounts are (host_sandboxer/mountns; None: here)."""
        self.root = root
        self.host_dir = root / container_id
        self.container_id = container_id
        self.space = space or Here()

    def prepare(self, host_bundle: str, rootfs_mounts, pod_namespaces: dict) -> None:
        """Mount the rootfs, expose the binds and write the guest's config.json; undo on failure.

        Each mount is made here, detached, as the host sees its source, and attached in the
        pod's mount space with the bundle (mountns/ops.py `prepare_bundle`)."""
        spec = read_host_spec(host_bundle)
        try:
            rewritten = rewrite_spec(spec, self.container_id, pod_namespaces)
        except SpecError as exc:
            raise HostError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"container {self.container_id}: {exc}") from None
        fds: list[int] = []
        try:
            rootfs = str(self.host_dir / ROOTFS_DIR)
            attach = [[fd, rootfs, True] for fd in self._rootfs_mounts(host_bundle, spec, rootfs_mounts, fds)]
            missing = [e for e in rewritten.exposures if not os.path.exists(e.host_source)]
            unresolved = drop_missing_pod_files(rewritten.spec, missing)
            if unresolved:
                raise HostError(grpc.StatusCode.NOT_FOUND,
                                f"container {self.container_id}: bind source(s) missing: "
                                + ", ".join(e.host_source for e in unresolved))
            for exposure in (e for e in rewritten.exposures if e not in missing):
                fds.append(mounts.detached("bind", exposure.host_source, exposure.options))
                if mounts.access_of(exposure.options) == mounts.READ_ONLY:
                    recursive = mounts.split_options(exposure.options)[0] & mounts.MS_REC
                    reopen_submounts(rewritten.spec, exposure,  # what the recursive copy holds
                                     mounts.submounts_of(Path(exposure.host_source)) if recursive else [])
                attach.append([fds[-1], str(self.root / exposure.shared_path), os.path.isdir(exposure.host_source)])
            self.space.run("prepare_bundle", str(self.host_dir), attach, json.dumps(rewritten.spec), fds=tuple(fds))
        except mounts.MountError as exc:
            code = grpc.StatusCode.ALREADY_EXISTS if exc.errno == errno.EEXIST \
                else grpc.StatusCode.FAILED_PRECONDITION
            what = "already has a bundle" if exc.errno == errno.EEXIST else exc.strerror
            raise HostError(code, f"container {self.container_id}: {what}") from None
        finally:
            for fd in fds:
                os.close(fd)

    def _rootfs_mounts(self, host_bundle: str, spec: dict, rootfs_mounts, fds: list[int]) -> list[int]:
        """The rootfs as detached mounts, stacked in this order (also added to `fds`)."""
        if rootfs_mounts:
            for m in rootfs_mounts:
                fds.append(mounts.detached(m.type, m.source, list(m.options)))
            return fds[-len(rootfs_mounts):]
        # No mounts from containerd: the spec's root.path is a ready directory on the host.
        root = (spec.get("root") or {})
        source = os.path.join(host_bundle, root.get("path") or ROOTFS_DIR)
        fds.append(mounts.clone(source, recursive=True,
                                access=mounts.READ_ONLY if root.get("readonly") else mounts.READ_WRITE))
        return fds[-1:]

    def cleanup(self) -> None:
        """Unmount everything under the bundle, then remove it (never through a live mount)."""
        try:
            left = self.space.run("remove_bundle", str(self.host_dir))
        except mounts.MountError as exc:
            left = [exc.strerror]
        if left:
            log.error("container %s: mounts still present, not removing %s: %s",
                      self.container_id, self.host_dir, left)
