"""The newc writer against GNU cpio: what it lists and what it extracts must be what we wrote."""
import os
import stat
import subprocess

from initrd import cpio
from initrd.tree import Tree

EPOCH = 1_234_567_890


def sample_tree() -> Tree:
    tree = Tree()
    tree.file("usr/bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    tree.file("etc/hosts", b"127.0.0.1 localhost\n")
    tree.file("empty", b"")
    tree.file("odd-size", b"x" * 4097)
    tree.symlink("sbin/init", "../usr/bin/tool")
    tree.directory("tmp", 0o1777)
    tree.chardev("dev/null", 1, 3, 0o666)
    return tree


def archive(tmp_path, tree: Tree):
    path = tmp_path / "image.cpio"
    with open(path, "wb") as out:
        cpio.write_newc(tree.entries.values(), out, mtime=EPOCH)
    return path


def test_cpio_lists_every_entry_in_sorted_order(tmp_path):
    tree = sample_tree()
    listing = subprocess.run(["cpio", "-t", "--quiet"], stdin=open(archive(tmp_path, tree), "rb"),
                             capture_output=True, text=True, check=True).stdout.split()
    assert listing == sorted(tree.entries, key=lambda p: p.split("/"))
    assert "usr" in listing and "usr/bin" in listing  # parents created implicitly


def test_cpio_extracts_contents_modes_links_devices_and_mtime(tmp_path):
    tree = sample_tree()
    dest = tmp_path / "out"
    dest.mkdir()
    subprocess.run(["cpio", "-i", "-d", "--quiet", "--no-absolute-filenames",
                    "--preserve-modification-time"], cwd=dest,
                   stdin=open(archive(tmp_path, tree), "rb"), check=True)
    assert (dest / "usr/bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((dest / "usr/bin/tool").stat().st_mode) == 0o755
    assert (dest / "odd-size").read_bytes() == b"x" * 4097
    assert (dest / "empty").read_bytes() == b""
    assert os.readlink(dest / "sbin/init") == "../usr/bin/tool"
    assert stat.S_IMODE((dest / "tmp").stat().st_mode) == 0o1777
    null = (dest / "dev/null").stat()
    assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert int((dest / "etc/hosts").stat().st_mtime) == EPOCH
    assert (dest / "etc/hosts").stat().st_uid == 0


def test_conflicting_entries_for_one_path_are_refused():
    tree = Tree()
    tree.file("a", b"1")
    tree.file("a", b"1")  # the same entry again is fine
    try:
        tree.file("a", b"2")
    except ValueError as e:
        assert "/a" in str(e)
    else:
        raise AssertionError("a second, different /a was accepted")
