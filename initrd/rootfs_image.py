"""The guest tree as a read-only erofs image (build/guest/rootfs.img) for a virtio-pmem root.

The kernel mounts it with DAX: file pages are the host file's pages, shared by every VM through
the host's page cache, instead of an initrd unpacked into each guest's RAM. Built with
mkfs.erofs (erofs-utils) from the same `Tree` as the initrd, so both hold the same files:

- uncompressed, and no inline (tail-packed) data: erofs serves only plain-layout files by DAX;
- every timestamp SOURCE_DATE_EPOCH, a fixed UUID, owned by root, no xattrs: the same tree
  always gives the same bytes;
- zero-padded to 2 MiB: the guest page-maps a pmem region in 2 MiB subsections (ZONE_DEVICE), and
  QEMU maps the whole file as the device (its size must stay a multiple of that).
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from initrd import cpio
from initrd.tree import Tree

MKFS = "mkfs.erofs"
UUID = "766d6d2d-7461-736b-2d72-6f6f74667321"  # fixed: builds never depend on a random one
ALIGN = 2 << 20


def materialise(tree: Tree, root: Path) -> None:
    """Write `tree` under `root` (empty or absent) with its modes; parents come first. The root
    directory is 0755 whatever the umask (its mode is the guest's /)."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    for path in sorted(tree.entries, key=lambda p: p.split("/")):
        entry = tree.entries[path]
        target = root / path
        if entry.kind == "dir":
            target.mkdir()
        elif entry.kind == "file":
            target.write_bytes(entry.data)
        elif entry.kind == "symlink":
            os.symlink(entry.data.decode(), target)
            continue
        elif entry.kind == "chardev":
            os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(*entry.rdev))
        os.chmod(target, stat.S_IMODE(entry.mode))


def mkfs_command(image: Path, root: Path, epoch: int) -> list[str]:
    return [MKFS, "--quiet", "-x", "-1", "-E", "noinline_data", f"-T{epoch}", f"-U{UUID}",
            "--all-root", str(image), str(root)]


def padded(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


def build_image(tree: Tree, image: Path) -> None:
    """`image` (replaced atomically) holding `tree`."""
    if shutil.which(MKFS) is None:
        raise RuntimeError(f"no {MKFS}: `make setup` installs erofs-utils")
    partial = image.with_name(image.name + ".partial")
    with tempfile.TemporaryDirectory(prefix="rootfs-image-") as tmp:
        root = Path(tmp) / "root"
        materialise(tree, root)
        partial.unlink(missing_ok=True)
        subprocess.run(mkfs_command(partial, root, cpio.source_date_epoch()), check=True,
                       stdout=subprocess.DEVNULL)
    with open(partial, "r+b") as f:
        f.truncate(padded(partial.stat().st_size))
    partial.replace(image)
