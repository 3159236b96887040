"""The erofs root image: the same tree gives the same bytes, its files come back out as they went
in (fsck.erofs extracts them), and its size is a multiple of the 2 MiB the guest's pmem needs."""
import os
import stat
import subprocess
import time

import pytest

from initrd import rootfs_image
from initrd.tree import Tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="device nodes need root (mknod)")


def sample_tree() -> Tree:
    tree = Tree()
    tree.file("usr/bin/tool", b"\x7fELF" + bytes(range(256)) * 40, 0o755)
    tree.file("etc/hostname", b"guest\n")
    tree.symlink("sbin/init", "../usr/bin/tool")
    tree.directory("tmp", 0o1777)
    tree.chardev("dev/console", 5, 1, 0o600)
    return tree


def test_the_same_tree_gives_the_same_bytes(tmp_path):
    first, second = tmp_path / "a.img", tmp_path / "b.img"
    rootfs_image.build_image(sample_tree(), first)
    time.sleep(1.1)  # a clock-dependent field (build time, mtimes) would now differ
    old = os.umask(0o077)
    try:
        rootfs_image.build_image(sample_tree(), second)
    finally:
        os.umask(old)
    assert first.read_bytes() == second.read_bytes()
    assert first.stat().st_size % (2 << 20) == 0


def test_files_modes_links_and_devices_survive(tmp_path):
    image, out = tmp_path / "root.img", tmp_path / "out"
    rootfs_image.build_image(sample_tree(), image)
    subprocess.run(["fsck.erofs", f"--extract={out}", str(image)], check=True,
                   capture_output=True)
    assert (out / "usr/bin/tool").read_bytes() == sample_tree().entries["usr/bin/tool"].data
    assert stat.S_IMODE((out / "usr/bin/tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "tmp").stat().st_mode) == 0o1777
    assert os.readlink(out / "sbin/init") == "../usr/bin/tool"
    console = (out / "dev/console").lstat()
    assert stat.S_ISCHR(console.st_mode) and os.major(console.st_rdev) == 5
