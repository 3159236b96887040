"""The guest's file systems: /proc, /sys, /dev, /run, cgroups, and the shared directory.

Each mount is attempted independently; a failure is returned as a message naming what failed
(the caller logs it and the boot goes on), an already mounted target (EBUSY) is not a failure.
"""

import errno
import os

from vmm_task.init import syscalls as sc

# (source, target, fstype, flags, data)
BASE_MOUNTS = (
    ("proc", "/proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, None),
    ("sysfs", "/sys", "sysfs", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, None),
    ("devtmpfs", "/dev", "devtmpfs", sc.MS_NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", sc.MS_NOSUID | sc.MS_NOEXEC, "ptmxmode=0666,mode=0620,gid=5"),
    ("shm", "/dev/shm", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0755"),
)
CGROUP_ROOT = "/sys/fs/cgroup"
_CGROUP_FLAGS = sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC
# v1 controllers that share one hierarchy (as systemd and Docker mount them)
_V1_CO_MOUNTED = {"cpu": "cpu,cpuacct", "cpuacct": "cpu,cpuacct",
                  "net_cls": "net_cls,net_prio", "net_prio": "net_cls,net_prio"}


def mount_one(source, target, fstype, flags=0, data=None) -> str | None:
    """Mount, creating the target directory; None on success, else what failed."""
    try:
        os.makedirs(target, exist_ok=True)
        sc.mount(source, target, fstype, flags, data)
    except OSError as e:
        if e.errno == errno.EBUSY:
            return None
        return f"mount {fstype} on {target} failed: {e}"
    return None


def mount_base() -> list[str]:
    return [p for p in (mount_one(*m) for m in BASE_MOUNTS) if p]


def mount_cgroups(mode: str) -> list[str]:
    """mode "v2": cgroup2 at /sys/fs/cgroup with every controller delegated to children;
    "v1": one hierarchy per controller under a tmpfs; "hybrid": v1 plus cgroup2 at ./unified."""
    if mode == "v2":
        problem = mount_one("cgroup2", CGROUP_ROOT, "cgroup2", _CGROUP_FLAGS, "nsdelegate")
        return [problem] if problem else enable_v2_controllers(CGROUP_ROOT)
    problems = [p for p in [mount_one("cgroup", CGROUP_ROOT, "tmpfs", _CGROUP_FLAGS, "mode=0755")]
                if p]
    problems += _mount_v1_hierarchies()
    if mode == "hybrid":
        problem = mount_one("cgroup2", f"{CGROUP_ROOT}/unified", "cgroup2", _CGROUP_FLAGS)
        problems += [problem] if problem else []
    return problems


def v1_controllers(proc_cgroups: str) -> list[str]:
    """Enabled controller names from the text of /proc/cgroups."""
    names = []
    for line in proc_cgroups.splitlines():
        fields = line.split()
        if len(fields) == 4 and not line.startswith("#") and fields[3] == "1":
            names.append(fields[0])
    return names


def _mount_v1_hierarchies() -> list[str]:
    try:
        with open("/proc/cgroups") as f:
            controllers = v1_controllers(f.read())
    except OSError as e:
        return [f"cannot list cgroup controllers from /proc/cgroups: {e}"]
    problems = []
    for hierarchy in dict.fromkeys(_V1_CO_MOUNTED.get(c, c) for c in controllers):
        target = f"{CGROUP_ROOT}/{hierarchy}"
        problem = mount_one("cgroup", target, "cgroup", _CGROUP_FLAGS, hierarchy)
        if problem:
            problems.append(problem)
            continue
        if "," in hierarchy:  # cpu -> cpu,cpuacct etc., the names runtimes look for
            for name in hierarchy.split(","):
                _symlink(hierarchy, f"{CGROUP_ROOT}/{name}")
    if "memory" in controllers:
        # hierarchical accounting, so a pod-level limit covers its containers (as Kuasar does)
        problems += _write(f"{CGROUP_ROOT}/memory/memory.use_hierarchy", "1")
    return problems


def enable_v2_controllers(root: str) -> list[str]:
    """Delegate every available controller to child cgroups (containers live there)."""
    try:
        with open(f"{root}/cgroup.controllers") as f:
            controllers = f.read().split()
    except OSError as e:
        return [f"cannot read {root}/cgroup.controllers: {e}"]
    return _write(f"{root}/cgroup.subtree_control", " ".join(f"+{c}" for c in controllers))


def mount_shared_dir(sharefs_type: str, target: str) -> list[str]:
    """The host's shared directory (tag "kuasar") at `target`: virtiofs, 9p, or none."""
    if sharefs_type == "virtiofs":
        problem = mount_one("kuasar", target, "virtiofs", sc.MS_NODEV)
    elif sharefs_type == "9p":
        problem = mount_one("kuasar", target, "9p", sc.MS_NODEV,
                            "trans=virtio,version=9p2000.L,msize=262144,cache=mmap")
    else:
        return []
    return [problem] if problem else []


def _symlink(source: str, link: str) -> None:
    try:
        os.symlink(source, link)
    except FileExistsError:
        pass


def _write(path: str, text: str) -> list[str]:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        return [f"cannot write {text!r} to {path}: {e}"]
    return []
