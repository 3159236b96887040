"""The daemon's state directory: one root-only directory per sandbox holding its state file.

Layout (`STATE_DIR` is `--dir`):
    STATE_DIR/                   0700
      <sandbox-id>/              0700, everything of the pod: sockets, console log, shared dir
        state.json               the pod record, replaced atomically (write, fsync, rename)
        task.sock                the pod's containerd.task.v3.Task server
        mounts/                  a tmpfs of the pod's own (containment/pod_tmpfs.py): containers' bundles,
                                 rootfs and bind mounts
        shared/                  what the guest mounts (virtiofs/9p tag `kuasar`): mounts/, read-only
      .mntns/ns                  the pods' mount namespace, where mounts/ and shared/ are mounted
                                 (host_sandboxer/mountns): the daemon's `mount_space`
A restarted daemon reads every `state.json` to recover its pods.
"""

import json
import logging
import os
import shutil
from pathlib import Path

from host_sandboxer.mountns.space import Here
from host_sandboxer.sandbox.ids import InvalidID, check_id

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


class StateDir:
    """The root-only state directory of one daemon."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.mount_space = Here()  # where pods' mounts are made; the daemon's: mountns.space.Pinned

    def sandbox_dir(self, sandbox_id: str) -> Path:
        return self.root / check_id("sandbox", sandbox_id)

    def create_sandbox_dir(self, sandbox_id: str) -> Path:
        path = self.sandbox_dir(sandbox_id)
        path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
        return path

    def write_state(self, sandbox_id: str, record: dict) -> None:
        """Replace the sandbox's state file atomically: a crash leaves the old or the new one."""
        path = self.sandbox_dir(sandbox_id) / STATE_FILE
        tmp = path.with_name(f".{STATE_FILE}.tmp")
        data = json.dumps(record, indent=1, sort_keys=True).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def load_all(self) -> dict[str, dict]:
        """Every sandbox record on disk; unreadable ones are logged and skipped, not deleted."""
        records = {}
        for entry in sorted(self.root.iterdir()):
            try:
                check_id("sandbox", entry.name)
            except InvalidID:
                continue
            path = entry / STATE_FILE
            if not path.is_file():
                continue
            try:
                records[entry.name] = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                log.error("sandbox %s: unreadable state file %s: %s", entry.name, path, exc)
        return records

    def remove_sandbox_dir(self, sandbox_id: str) -> None:
        shutil.rmtree(self.sandbox_dir(sandbox_id), ignore_errors=True)
