"""`make floor-image`: the boot benchmark's floors, in build/guest-floor/.

- initrd.img: the same kernel as the guest with the smallest useful initrd: a static busybox
  whose /init prints one line at once and then sleeps (PID 1 must not exit). Booting it measures
  what the kernel and QEMU cost before any agent runs.
- python-rootfs.img: a pmem root like the guest's whose /init is a Nuitka-compiled Python program
  that does the same (initrd/python_floor_init.py, built with the agent's options). Booting it
  measures what a Python PID 1 costs before its first line of work: the agent's start-up is
  compared with this, its own code with nothing else.
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

from initrd import agent as agent_build, compress, cpio, image, rootfs_image
from initrd.guest_image import REPO, compressed_image, write_atomic
from initrd.tree import Tree
from kernel import build as kernel_build

# The launcher waits for "vmm-task ready" on the console; the floor prints it too, so both images
# are booted and timed by exactly the same code.
READY_LINE = "vmm-task ready (floor: static busybox /init)"
BUSYBOX = "/bin/busybox"
# It reports its uptime as `ready=` the way the agent does, so both are compared on the guest clock.
INIT = f"""#!/usr/bin/busybox sh
/usr/bin/busybox mount -t proc proc /proc
read uptime idle < /proc/uptime
echo "{READY_LINE} ready=${{uptime}}s"
exec /usr/bin/busybox sleep 2147483647
"""


PYTHON_FLOOR_ENTRY = Path(__file__).with_name("python_floor_init.py")


def _with_console(tree: Tree) -> Tree:
    """What the kernel needs to start /init with a console: /dev/console (and /dev/null, /proc)."""
    tree.directory("proc", 0o555)
    tree.chardev("dev/console", 5, 1, 0o600)
    tree.chardev("dev/null", 1, 3, 0o666)
    return tree


def floor_tree() -> Tree:
    tree = Tree()
    tree.copy_host_path(BUSYBOX, "usr/bin/busybox")
    tree.file("init", INIT.encode(), 0o755)
    return _with_console(tree)


def python_floor_tree(compiled: agent_build.Agent) -> Tree:
    """The compiled Python floor where the guest image has its agent (/init -> sbin/init -> the
    binary, the libraries it needs beside libc), and nothing else."""
    tree = Tree()
    image.add_agent(tree, compiled)
    return _with_console(tree)


def build_floor(out: Path, method: str, cache: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    raw = io.BytesIO()
    cpio.write_newc(floor_tree().entries.values(), raw)
    write_atomic(out / "initrd.img", compressed_image(raw.getvalue(), method, cache))
    return out / "initrd.img"


def build_python_floor(out: Path, cache: Path, progress=print) -> Path:
    """out/python-rootfs.img; the Nuitka build is cached like the agent's (cache/python-floor)."""
    out.mkdir(parents=True, exist_ok=True)
    compiled = agent_build.ensure_compiled(cache / "python-floor", PYTHON_FLOOR_ENTRY, progress)
    rootfs_image.build_image(python_floor_tree(compiled), out / "python-rootfs.img")
    return out / "python-rootfs.img"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "guest-floor")
    parser.add_argument("--compression", default=compress.DEFAULT, choices=sorted(compress.COMMANDS))
    args = parser.parse_args()
    cache = kernel_build.default_cache()
    initrd = build_floor(args.out, args.compression, cache)
    print(f"floor-image: {initrd} ({initrd.stat().st_size / 1e6:.1f} MB, /init prints "
          f"{READY_LINE!r})")
    rootfs = build_python_floor(args.out, cache)
    print(f"floor-image: {rootfs} ({rootfs.stat().st_size / 1e6:.1f} MB, a pmem root whose /init "
          f"is {PYTHON_FLOOR_ENTRY.name} compiled by Nuitka)")


if __name__ == "__main__":
    main()
