"""Two builds from the same inputs give byte-identical images, whatever the host's timestamps,
owners or directory order."""
import hashlib
import importlib.util
import io
import os
from pathlib import Path

import pytest

from initrd import compress, cpio, guest_runtime, pod_pause
from initrd.tree import Tree
from kernel.build import default_cache

REPO = Path(__file__).resolve().parents[2]


def userland_module():
    spec = importlib.util.spec_from_file_location("userland", REPO / "rootfs-builder/userland.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def image_sha256(tree: Tree, method: str) -> str:
    raw = io.BytesIO()
    cpio.write_newc(tree.entries.values(), raw)
    return hashlib.sha256(compress.compress(raw.getvalue(), method)).hexdigest()


def host_dir(root: Path, names: list[str], mtime: int) -> Path:
    root.mkdir()
    for name in names:
        (root / name).write_text(f"contents of {name}\n")
        os.utime(root / name, (mtime, mtime))
    (root / "link").symlink_to("x")
    return root


@pytest.mark.parametrize("method", sorted(set(compress.COMMANDS) - {"none"}))
def test_same_files_created_differently_give_the_same_image(tmp_path, method):
    first, second = Tree(), Tree()
    first.copy_host_dir(host_dir(tmp_path / "a", ["x", "y", "z"], 1_000), "opt")
    second.copy_host_dir(host_dir(tmp_path / "b", ["z", "x", "y"], 2_000_000), "opt")
    assert image_sha256(first, method) == image_sha256(second, method)


def test_the_real_userland_builds_reproducibly(tmp_path):
    """Runtime included: extracted from the pinned packages and patched twice (the .debs come
    from the cache `make guest-image` fills; a fresh machine fetches them here); pod-pause
    compiled twice, into two empty caches."""
    userland = userland_module()
    images = []
    for build in ("first", "second"):
        tree = Tree()
        userland.build_userland(tree, guest_runtime.prepare("crun", default_cache()),
                                pod_pause.build(tmp_path / build), debug=True)
        images.append(image_sha256(tree, compress.DEFAULT))
    assert images[0] == images[1]
    assert "usr/bin/crun" in tree and "etc/passwd" in tree and "dev/console" in tree
    assert "usr/lib/vmm-task-runtime/ld-linux-x86-64.so.2" in tree
    assert pod_pause.GUEST_PATH in tree


def test_source_date_epoch_changes_the_image(monkeypatch):
    tree = Tree()
    tree.file("f", b"data")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1")
    one = image_sha256(tree, "gzip")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "2")
    assert image_sha256(tree, "gzip") != one
