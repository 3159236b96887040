"""Assemble the guest's initrd contents: the Nuitka agent as /sbin/init (and /init), the system
libraries its dist does not ship (the build host's), and the userland from rootfs-builder/ (the
container runtime from pinned Debian packages, with its own libraries and loader; pod-pause).

Layout: /usr/lib/vmm-task/ holds the dist, /sbin/init -> ../usr/lib/vmm-task/vmm-task,
/init -> sbin/init (the kernel runs /init from an initramfs).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from initrd import elf
from initrd.agent import Agent
from initrd.guest_runtime import Runtime
from initrd.tree import Tree

AGENT_DIR = "usr/lib/vmm-task"
_USERLAND = Path(__file__).resolve().parent.parent / "rootfs-builder" / "userland.py"


def _userland_module():
    """rootfs-builder/ is a directory name, not an importable package: load its module by path."""
    spec = importlib.util.spec_from_file_location("rootfs_builder_userland", _USERLAND)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_agent(tree: Tree, agent: Agent) -> None:
    tree.copy_host_dir(agent.dist, AGENT_DIR)
    tree.symlink("sbin/init", f"../{AGENT_DIR}/{agent.binary}")
    tree.symlink("init", "sbin/init")
    shipped = [p for p in agent.dist.rglob("*") if p.is_file() and not p.is_symlink()]
    for lib in sorted(elf.closure(shipped, provided={p.name for p in shipped})):
        tree.copy_host_path(lib)
    _link_executable_libraries(tree, agent)


def _link_executable_libraries(tree: Tree, agent: Agent) -> None:
    """The loader finds the executable's own $ORIGIN through /proc/self/exe, which PID 1 starts
    without: link the dist libraries the executable needs into the system library directory
    (where libc is), so they resolve by the default search path instead."""
    dist = agent.dist.resolve()
    libs = elf.shared_libraries(agent.dist / agent.binary)
    libc = next(Path(lib) for lib in libs if Path(lib).name.startswith("libc.so"))
    system_dir = str(libc.resolve().parent).strip("/")
    for lib in sorted(map(Path, libs)):
        if lib.resolve().is_relative_to(dist):
            tree.symlink(f"{system_dir}/{lib.name}", f"/{AGENT_DIR}/{lib.resolve().relative_to(dist)}")


def guest_tree(agent: Agent, runtime: Runtime, pod_pause: Path, debug: bool) -> Tree:
    """Everything in the guest initrd. The agent goes first so no busybox applet can take
    /sbin/init."""
    tree = Tree()
    add_agent(tree, agent)
    _userland_module().build_userland(tree, runtime, pod_pause, debug)
    return tree
