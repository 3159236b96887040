"""`make floor-image`: the boot benchmark's floor, build/guest-floor/initrd.img.

The same kernel as the guest with the smallest useful initrd: a static busybox whose /init prints
one line at once and then sleeps (PID 1 must not exit). Booting it measures what the kernel and
QEMU cost before any agent runs.
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

from initrd import compress, cpio
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


def floor_tree() -> Tree:
    tree = Tree()
    tree.copy_host_path(BUSYBOX, "usr/bin/busybox")
    tree.file("init", INIT.encode(), 0o755)
    tree.directory("proc", 0o555)
    tree.chardev("dev/console", 5, 1, 0o600)
    tree.chardev("dev/null", 1, 3, 0o666)
    return tree


def build_floor(out: Path, method: str, cache: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    raw = io.BytesIO()
    cpio.write_newc(floor_tree().entries.values(), raw)
    write_atomic(out / "initrd.img", compressed_image(raw.getvalue(), method, cache))
    return out / "initrd.img"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "guest-floor")
    parser.add_argument("--compression", default=compress.DEFAULT, choices=sorted(compress.COMMANDS))
    args = parser.parse_args()
    image = build_floor(args.out, args.compression, kernel_build.default_cache())
    print(f"floor-image: {image} ({image.stat().st_size / 1e6:.1f} MB, /init prints "
          f"{READY_LINE!r})")


if __name__ == "__main__":
    main()
