"""The guest userland around the agent: the container runtime with exactly the shared libraries
it loads (from pinned Debian 13 packages: initrd/guest_runtime.py), the pod PID namespace's
init (pod-pause.c, initrd/pod_pause.py), a minimal /etc, the mount points the agent mounts onto, the device nodes the kernel
needs before devtmpfs is mounted, and (debug builds only) a static busybox with its applets.

Nothing else goes in: under TCG every megabyte of initrd is boot time.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from initrd import elf, guest_runtime, pod_pause
from initrd.tree import Tree

ETC_DIR = Path(__file__).resolve().parent / "etc"
BUSYBOX = "/bin/busybox"
# Mounted by the agent (proc, sysfs, devtmpfs, devpts, shm, tmpfs on run/tmp, cgroup2) or used
# as $HOME / scratch by the runtime.
MOUNT_POINTS = {"proc": 0o555, "sys": 0o555, "dev": 0o755, "run": 0o755, "tmp": 0o1777,
                "root": 0o700, "mnt": 0o755, "var": 0o755}


def add_runtime(tree: Tree, runtime: guest_runtime.Runtime) -> None:
    tree.file(runtime.binary, runtime.executable, 0o755)
    for soname, library in runtime.libraries.items():
        tree.file(f"{runtime.lib_dir}/{soname}", library.data, library.mode)


def add_pod_pause(tree: Tree, binary: Path) -> None:
    """pod-pause and the host libraries it loads (the agent's libc: the same files)."""
    tree.file(pod_pause.GUEST_PATH, binary.read_bytes(), 0o755)
    for lib in sorted(elf.closure([binary])):
        tree.copy_host_path(lib)


def add_etc(tree: Tree) -> None:
    for path in sorted(ETC_DIR.iterdir()):
        tree.file(f"etc/{path.name}", path.read_bytes())


def add_skeleton(tree: Tree) -> None:
    """Mount points, and the device nodes needed before the agent mounts devtmpfs: the console
    (the kernel opens it for PID 1's stdio), null, and urandom (Python seeds its hash
    randomisation from it when getrandom() would still block this early in boot)."""
    for name, mode in MOUNT_POINTS.items():
        tree.directory(name, mode)
    tree.chardev("dev/console", 5, 1, 0o600)
    tree.chardev("dev/null", 1, 3, 0o666)
    tree.chardev("dev/urandom", 1, 9, 0o666)


def add_busybox(tree: Tree) -> None:
    """Static busybox at usr/bin/busybox with every applet linked to it (never over a path the
    image already has, e.g. /sbin/init)."""
    if elf.shared_libraries(Path(BUSYBOX)):
        raise RuntimeError(f"{BUSYBOX} is not static (apt-get install busybox-static)")
    tree.copy_host_path(BUSYBOX, "usr/bin/busybox")
    applets = subprocess.run([BUSYBOX, "--list-full"], check=True, capture_output=True,
                             text=True).stdout.split()
    for applet in sorted(applets):
        if applet not in tree and applet != "linuxrc":
            depth = applet.count("/")
            tree.symlink(applet, "../" * depth + "usr/bin/busybox")


def build_userland(tree: Tree, runtime: guest_runtime.Runtime, pod_pause_binary: Path,
                   debug: bool) -> None:
    add_skeleton(tree)
    add_etc(tree)
    add_runtime(tree, runtime)
    add_pod_pause(tree, pod_pause_binary)
    if debug:
        add_busybox(tree)
