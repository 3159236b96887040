"""A container's bundle as the guest sees it: `<pod>/mounts/<container-id>/` on the host.

Holds the rewritten config.json, `rootfs/` (containerd's rootfs mounts performed on the host)
and `mounts/<n>` (the spec's bind sources). The guest finds it at
`/run/kuasar/state/<container-id>` through the shared directory, a read-only view of
`<pod>/mounts/` (see mounts.export_readonly).
"""

import json
import logging
import os
import shutil
from pathlib import Path

import grpc

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
    def __init__(self, root: Path, container_id: str):
        self.root = root
        self.host_dir = root / container_id
        self.container_id = container_id

    def prepare(self, host_bundle: str, rootfs_mounts, pod_namespaces: dict) -> None:
        """Mount the rootfs, expose the binds and write the guest's config.json; undo on failure."""
        spec = read_host_spec(host_bundle)
        try:
            rewritten = rewrite_spec(spec, self.container_id, pod_namespaces)
        except SpecError as exc:
            raise HostError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"container {self.container_id}: {exc}") from None
        if self.host_dir.exists():
            raise HostError(grpc.StatusCode.ALREADY_EXISTS,
                            f"container {self.container_id} already has a bundle")
        self.host_dir.mkdir(mode=0o700)
        try:
            self._mount_rootfs(host_bundle, spec, rootfs_mounts)
            missing = [e for e in rewritten.exposures if not os.path.exists(e.host_source)]
            unresolved = drop_missing_pod_files(rewritten.spec, missing)
            if unresolved:
                raise HostError(grpc.StatusCode.NOT_FOUND,
                                f"container {self.container_id}: bind source(s) missing: "
                                + ", ".join(e.host_source for e in unresolved))
            for exposure in (e for e in rewritten.exposures if e not in missing):
                target = self.root / exposure.shared_path
                mounts.mount_one("bind", exposure.host_source, target, exposure.options)
                if mounts.access_of(exposure.options) == mounts.READ_ONLY:
                    reopen_submounts(rewritten.spec, exposure, mounts.submounts_of(target))
            self._write_config(rewritten.spec)
            # Everything the host mounts for this container is in place: now the guest may write
            # in the bundle (the agent adjusts config.json), through a writable mount of its own.
            mounts.bind(str(self.host_dir), self.host_dir, recursive=True)
        except mounts.MountError as exc:
            self.cleanup()
            raise HostError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"container {self.container_id}: {exc.strerror}") from None
        except BaseException:
            self.cleanup()
            raise

    def _mount_rootfs(self, host_bundle: str, spec: dict, rootfs_mounts) -> None:
        target = self.host_dir / ROOTFS_DIR
        target.mkdir()
        if rootfs_mounts:
            for m in rootfs_mounts:
                mounts.mount_one(m.type, m.source, target, list(m.options))
            return
        # No mounts from containerd: the spec's root.path is a ready directory on the host.
        root = (spec.get("root") or {})
        source = os.path.join(host_bundle, root.get("path") or ROOTFS_DIR)
        mounts.bind(source, target, recursive=True,
                    access=mounts.READ_ONLY if root.get("readonly") else mounts.READ_WRITE)

    def _write_config(self, spec: dict) -> None:
        path = self.host_dir / "config.json"
        tmp = path.with_name(".config.json.tmp")
        tmp.write_text(json.dumps(spec))
        os.replace(tmp, path)

    def cleanup(self) -> None:
        """Unmount everything under the bundle, then remove it (never through a live mount)."""
        if not self.host_dir.exists():
            return
        mounts.unmount_all_under(self.host_dir)
        left = mounts.mountpoints_under(self.host_dir)
        if left:
            log.error("container %s: mounts still present, not removing %s: %s",
                      self.container_id, self.host_dir, left)
            return
        shutil.rmtree(self.host_dir, ignore_errors=True)
