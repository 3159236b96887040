"""The cgroups of a pod's VM and of the daemon's helpers, made in the cgroup filesystem.

Where: a pod's QEMU and virtiofsd run in `<parent>/vmm-<pod id>`, `parent` being the pod's
`linux.cgroup_parent` from CRI's PodSandboxConfig (kubelet's pod cgroup, whose limits are the
containers' plus the RuntimeClass overhead: the VM is charged to it and held by it), or the
configured `containment.cgroup_parent` for a pod without one. The vsock backend and the FIFO
keepers run in `<configured parent>/vmm-helpers`: not in the daemon's own cgroup, because they
outlive the daemon, and a service manager stopping the daemon kills its whole cgroup. A parent
is a path (`/kubepods/burstable/pod<uid>`, kubelet's cgroupfs driver) or a systemd slice
(`kubepods-burstable-pod<uid>.slice`, its systemd driver), nested as systemd nests slices. The
leaf is a plain directory, not a systemd scope made over D-Bus: systemd leaves a cgroup it did
not make alone, but does not know it.

Which hierarchies: on cgroup v2 (/sys/fs/cgroup is cgroup2) the one; otherwise (v1, or
systemd's hybrid layout, where the v2 hierarchy has no controllers) every v1 hierarchy of a
controller that accounts or limits (V1_CONTROLLERS), as runc's cgroupfs driver joins them; not
`devices`: a child inherits its parent's device rules, and they are the containers' business.
A directory made on the way gets what v2 and v1 need before anything can join it: its parent's
controllers enabled (v2), its parent's CPUs and memory nodes (v1 cpuset starts empty).

A process joins before it execs (launch.py writes `0` to each cgroup.procs), so nothing it
allocates, and no thread or child it makes, is ever outside. Removal kills whatever is left in
the cgroup (cgroup.kill on v2, SIGKILL of each process on v1), then removes the directories.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

CGROUP_MOUNT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = frozenset({"cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "hugetlb"})
V2_CONTROLLERS = ("cpu", "cpuset", "io", "memory", "pids", "hugetlb")
CPUSET_FILES = ("cpuset.cpus", "cpuset.mems")
REMOVE_TIMEOUT_S = 5.0
POD_PREFIX = "vmm-"
HELPERS = "vmm-helpers"


class CgroupError(RuntimeError):
    """A cgroup cannot be made, joined or removed; the message names the path."""


class Layout:
    """The cgroup hierarchies a cgroup is made in: v2's root, or the v1 hierarchies' roots."""

    def __init__(self, version: int, roots: Sequence[Path]):
        self.version = version
        self.roots = tuple(Path(root) for root in roots)

    @classmethod
    def probe(cls, mountinfo: str = "/proc/self/mountinfo") -> "Layout":
        v1: dict[frozenset, Path] = {}
        with open(mountinfo) as f:
            for line in f:
                before, _, after = line.partition(" - ")
                point, (fstype, _source, options) = before.split()[4], after.split()[:3]
                if fstype == "cgroup2" and Path(point) == CGROUP_MOUNT:
                    return cls(2, [CGROUP_MOUNT])
                controllers = frozenset(options.split(",")) & V1_CONTROLLERS
                if fstype == "cgroup" and controllers:
                    v1.setdefault(controllers, Path(point))
        if not v1:
            raise CgroupError(f"no cgroup hierarchy mounted at {CGROUP_MOUNT} (set containment.cgroups = false)")
        return cls(1, sorted(set(v1.values())))


def expand_parent(parent: str) -> str:
    """A cgroup parent as kubelet gives it, as a path below a hierarchy's root ("": the root).
    CgroupError for one that could leave the hierarchy or is no systemd slice name."""
    if parent.endswith(".slice") and "/" not in parent:
        return _expand_slice(parent)
    parts = [part for part in parent.split("/") if part]
    if any(part in (".", "..") for part in parts):
        raise CgroupError(f"cgroup parent {parent!r}: '.' and '..' are not allowed")
    return "/".join(parts)


def _expand_slice(name: str) -> str:
    """systemd's nesting: `a-b-c.slice` is `a.slice/a-b.slice/a-b-c.slice`; `-.slice` the root."""
    if name == "-.slice":
        return ""
    words = name[:-len(".slice")].split("-")
    if not all(words):
        raise CgroupError(f"cgroup parent {name!r} is not a systemd slice name (empty word between dashes)")
    return "/".join("-".join(words[:n]) + ".slice" for n in range(1, len(words) + 1))


def pod_path(pod_parent: str, default_parent: str, pod_id: str) -> str:
    """Where a pod's VM runs, below a hierarchy's root."""
    parent = expand_parent(pod_parent or default_parent)
    return f"{parent}/{POD_PREFIX}{pod_id}".lstrip("/")


def helpers_path(default_parent: str) -> str:
    return f"{expand_parent(default_parent)}/{HELPERS}".lstrip("/")


class Cgroup:
    """One cgroup: its directory in each hierarchy of a layout."""

    def __init__(self, version: int, dirs: Sequence[Path]):
        self.version = version
        self.dirs = tuple(Path(d) for d in dirs)

    @classmethod
    def at(cls, layout: Layout, path: str) -> "Cgroup":
        return cls(layout.version, [root / path for root in layout.roots])

    def record(self) -> dict:
        return {"version": self.version, "dirs": [str(d) for d in self.dirs]}

    @classmethod
    def from_record(cls, record: dict | None) -> "Cgroup | None":
        return cls(record["version"], record["dirs"]) if record else None

    @property
    def procs_files(self) -> tuple[str, ...]:
        """What a process writes `0` into to join (launch.py)."""
        return tuple(str(d / "cgroup.procs") for d in self.dirs)

    def create(self) -> None:
        """Make the directories (and the missing ones above them); CgroupError if one cannot be."""
        for leaf in self.dirs:
            try:
                for directory in [*reversed(leaf.parents), leaf]:
                    if directory.is_dir():
                        continue
                    if self.version == 2:
                        _enable_controllers(directory.parent)
                    directory.mkdir(exist_ok=True)
                    if self.version == 1:
                        _inherit_cpuset(directory)
                if self.version == 2:
                    _enable_controllers(leaf.parent)
            except OSError as exc:
                raise CgroupError(f"cannot make cgroup {leaf}: {exc.strerror}") from None

    def pids(self) -> set[int]:
        """The processes in it (in any of its directories)."""
        found = set()
        for path in self.procs_files:
            with contextlib.suppress(FileNotFoundError):
                found.update(int(pid) for pid in Path(path).read_text().split())
        return found

    def kill(self) -> None:
        """SIGKILL everything in it."""
        for directory in self.dirs:
            if (directory / "cgroup.kill").exists():  # v2 since Linux 5.14
                with contextlib.suppress(FileNotFoundError):
                    (directory / "cgroup.kill").write_text("1")
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def remove(self, timeout_s: float = REMOVE_TIMEOUT_S) -> None:
        """Kill what is left in it and remove its directories; CgroupError if they stay."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self.kill()
        while self.pids() and loop.time() < deadline:
            await asyncio.sleep(0.01)
            self.kill()
        for directory in self.dirs:
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise CgroupError(f"cannot remove cgroup {directory}: {exc.strerror} "
                                  f"(processes left: {sorted(self.pids())})") from None


def _enable_controllers(directory: Path) -> None:
    """Let `directory`'s children have the controllers it has (v2). Best effort: a cgroup with
    processes of its own cannot (EBUSY), and then its children only group and account CPU time."""
    available = set((directory / "cgroup.controllers").read_text().split())
    enabled = set((directory / "cgroup.subtree_control").read_text().split())
    for controller in V2_CONTROLLERS:
        if controller in available and controller not in enabled:
            try:
                (directory / "cgroup.subtree_control").write_text(f"+{controller}")
            except OSError as exc:
                log.debug("cgroup %s: cannot enable %s for its children: %s", directory, controller, exc.strerror)


def _inherit_cpuset(directory: Path) -> None:
    """A new v1 cpuset cgroup has no CPUs and no memory nodes: nothing could join it."""
    for name in CPUSET_FILES:
        own = directory / name
        if own.exists() and not own.read_text().strip():
            own.write_text((directory.parent / name).read_text())
