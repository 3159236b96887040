"""vmm_common.mount: the libc mount/umount2 wrapper shared by the agent and the host."""

import errno
import os

import pytest

from vmm_common import mount


def test_failed_mount_is_an_oserror_with_errno_naming_the_paths(tmp_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(OSError) as failure:
        mount.mount(str(tmp_path), str(missing), None, mount.MS_BIND)
    assert failure.value.errno == errno.ENOENT
    assert f"mount bind {tmp_path} on {missing}" in str(failure.value)


def test_failed_umount_names_the_target(tmp_path):
    with pytest.raises(OSError) as failure:
        mount.umount(str(tmp_path), mount.MNT_DETACH)  # a directory, not a mount point
    assert failure.value.errno == errno.EINVAL
    assert str(tmp_path) in str(failure.value)


def test_bind_mount_and_umount_round_trip(tmp_path):
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    target.mkdir()
    (source / "file").write_text("seen")
    mount.mount(str(source), str(target), None, mount.MS_BIND)
    try:
        assert (target / "file").read_text() == "seen"
    finally:
        mount.umount(str(target))
    assert not (target / "file").exists()


def test_new_mount_api_attaches_a_read_only_copy_and_failures_name_the_call(tmp_path):
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    target.mkdir()
    with pytest.raises(OSError) as failure:
        mount.open_tree(str(tmp_path / "missing"), mount.OPEN_TREE_CLONE)
    assert failure.value.errno == errno.ENOENT and f"open_tree {tmp_path}/missing" in str(failure.value)
    fd = mount.open_tree(str(source), mount.OPEN_TREE_CLONE | mount.OPEN_TREE_CLOEXEC)
    try:
        mount.mount_setattr(fd, mount.MOUNT_ATTR_RDONLY, recursive=False)
        mount.move_mount(fd, str(target))
    finally:
        os.close(fd)
    try:
        with pytest.raises(OSError) as failure:
            (target / "file").write_text("no")
        assert failure.value.errno == errno.EROFS
    finally:
        mount.umount(str(target))
    with pytest.raises(OSError) as failure:
        mount.mount_setattr(fd, mount.MOUNT_ATTR_RDONLY, recursive=False)  # closed
    assert failure.value.errno == errno.EBADF and f"mount_setattr fd {fd}" in str(failure.value)
