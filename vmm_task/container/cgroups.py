"""The cgroup(s) of a container, found from its init process, for Pids, Stats and OOM.

cgroup v2 (the guest): one directory under the cgroup2 mount. cgroup v1 (hybrid hosts, dev mode):
one directory per controller hierarchy. Paths are recorded while the init process lives, so
they still answer after it exited.
"""

import os
from typing import Optional

PROC_CGROUP = "/proc/{pid}/cgroup"
MOUNTINFO = "/proc/self/mountinfo"


def _mounts() -> tuple[Optional[tuple[str, str]], dict[str, tuple[str, str]]]:
    """(cgroup2 (root, mountpoint) or None, {v1 controller: (root, mountpoint)})."""
    v2, v1 = None, {}
    with open(MOUNTINFO, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            root, mountpoint = fields[3], fields[4]
            fstype, superopts = fields[sep + 1], fields[sep + 3]
            if fstype == "cgroup2" and v2 is None:
                v2 = (root, mountpoint)
            elif fstype == "cgroup":
                for option in superopts.split(","):
                    v1.setdefault(option[5:] if option.startswith("name=") else option,
                                  (root, mountpoint))
    return v2, v1


def _join(root_and_mountpoint: tuple[str, str], path: str) -> str:
    root, mountpoint = root_and_mountpoint
    if root != "/" and path.startswith(root):
        path = path[len(root):]
    return os.path.join(mountpoint, path.lstrip("/"))


class Cgroup:
    """`version` 1 or 2; `dirs`: {controller: directory} for v1, {"": directory} for v2."""

    def __init__(self, version: int, dirs: dict[str, str]):
        self.version = version
        self.dirs = dirs

    @classmethod
    def of_pid(cls, pid: int) -> Optional["Cgroup"]:
        """The cgroup(s) `pid` is in, or None when it cannot be read (process gone)."""
        try:
            with open(PROC_CGROUP.format(pid=pid), encoding="utf-8") as f:
                lines = f.read().splitlines()
            v2, v1 = _mounts()
        except OSError:
            return None
        dirs, unified = {}, None
        for line in lines:
            hierarchy, controllers, path = line.split(":", 2)
            if hierarchy == "0" and controllers == "":
                unified = path
                continue
            for controller in controllers.split(","):
                name = controller[5:] if controller.startswith("name=") else controller
                if name in v1:
                    dirs[name] = _join(v1[name], path)
        if "memory" in dirs or "pids" in dirs:
            return cls(1, dirs)
        if unified is not None and v2 is not None:
            return cls(2, {"": _join(v2, unified)})
        return None

    def dir(self, controller: str) -> Optional[str]:
        """Directory of `controller` (v1), or the one directory (v2)."""
        return self.dirs.get("" if self.version == 2 else controller)

    def read(self, controller: str, name: str) -> Optional[str]:
        directory = self.dir(controller)
        if directory is None:
            return None
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                return f.read()
        except OSError:
            return None

    def pids(self) -> list[int]:
        """Every process in the container's cgroup and its descendants."""
        top = self.dir("pids") or self.dir("memory") or next(iter(self.dirs.values()), None)
        found: list[int] = []
        if top is None:
            return found
        for directory, _, _ in os.walk(top):
            try:
                with open(os.path.join(directory, "cgroup.procs"), encoding="utf-8") as f:
                    found.extend(int(p) for p in f.read().split())
            except OSError:
                continue
        return sorted(set(found))


def flat_keyed(text: Optional[str]) -> dict[str, int]:
    """'key value' lines (memory.stat, cpu.stat, memory.events) as a dict."""
    result = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            result[parts[0]] = int(parts[1])
    return result


def single_value(text: Optional[str]) -> int:
    """A one-number file; "max" (no limit) reads as 0, as containerd's cgroups package does."""
    text = (text or "").strip()
    return int(text) if text.lstrip("-").isdigit() else 0
