"""Where a pod's mounts are made: `Pinned`, the pods' mount namespace of a state directory (the
daemon's), or `Here`, this process's own (tests that drive a bundle without a daemon)."""
from __future__ import annotations

import contextlib
import json
import logging
import subprocess
from pathlib import Path

from host_sandboxer import lean_python
from host_sandboxer.mountns.ops import OPERATIONS
from host_sandboxer.taskproxy import mounts
from vmm_common.mount import MNT_DETACH, MS_BIND, MS_PRIVATE, mount, umount

log = logging.getLogger(__name__)

WORKER = "host_sandboxer.mountns.worker"
WORKER_TIMEOUT_S = 60.0  # a worker only mounts, writes a config.json, or removes a bundle


class Here:
    """Mounts made in this process's own mount namespace."""

    namespace_file: str | None = None  # helpers run in ours
    made = True

    def ensure(self) -> None:
        """Nothing to make: this process' namespace exists."""

    def release(self) -> None:
        """Nothing to let go: this process' namespace is not ours to end."""

    def run(self, op: str, *args, fds: tuple[int, ...] = ()):
        return OPERATIONS[op](*args)


class Pinned:
    """The pods' mount namespace of `state_dir`, pinned at `<state_dir>/.mntns/ns`: made (a slave
    of ours) when a pod starts and it is not there, found again by a restarted daemon, released
    with the last pod (as the vsock backend and the task relay end with it)."""

    def __init__(self, state_dir: Path):
        self.pin_dir = Path(state_dir) / ".mntns"
        self.namespace_file = str(self.pin_dir / "ns")

    @property
    def made(self) -> bool:
        """Whether the namespace is there (a pod was started since the last one went)."""
        return mounts.is_mountpoint(Path(self.namespace_file))

    def ensure(self) -> None:
        """Make the namespace unless it is pinned already. A namespace file may be bound only
        on a mount that does not propagate (it would reach the namespace itself): the pin's
        directory is a private bind of itself."""
        if self.made:
            return
        self.pin_dir.mkdir(mode=0o700, exist_ok=True)
        try:
            if not mounts.is_mountpoint(self.pin_dir):
                mount(str(self.pin_dir), str(self.pin_dir), None, MS_BIND)
            mount("none", str(self.pin_dir), None, MS_PRIVATE)
        except OSError as exc:
            raise mounts.MountError(exc.errno, f"cannot pin the pods' mount namespace: {exc.strerror}") from None
        Path(self.namespace_file).touch(mode=0o600)
        made = subprocess.run(["unshare", f"--mount={self.namespace_file}", "--propagation", "slave", "true"],
                              capture_output=True, text=True)
        if made.returncode != 0:
            raise mounts.MountError(0, f"cannot make the pods' mount namespace: {made.stderr.strip()}")

    def release(self) -> None:
        """Unpin the namespace and remove the pin (when no pod is left: what is still mounted
        in it goes with it, once no process is in it)."""
        try:
            for point in (self.namespace_file, str(self.pin_dir)):
                if mounts.is_mountpoint(Path(point)):
                    umount(point, MNT_DETACH)
            Path(self.namespace_file).unlink(missing_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.pin_dir.rmdir()
        except OSError as exc:  # the pods are gone: a pin left costs a namespace, not them
            log.warning("cannot unpin the pods' mount namespace %s: %s", self.namespace_file, exc)

    def run(self, op: str, *args, fds: tuple[int, ...] = ()):
        """ops.`op`(*args) in the namespace; MountError(errno, message) if it fails."""
        worker = subprocess.run(lean_python.command(WORKER, self.namespace_file), pass_fds=fds,
                                input=json.dumps({"op": op, "args": list(args)}), capture_output=True,
                                text=True, timeout=WORKER_TIMEOUT_S)
        try:
            answer = json.loads(worker.stdout)
        except ValueError:
            raise mounts.MountError(0, f"the mount namespace's worker failed ({op}, exit {worker.returncode}): "
                                       f"{worker.stderr.strip()[-400:]}") from None
        if "error" in answer:
            raise mounts.MountError(*answer["error"])
        return answer["result"]
