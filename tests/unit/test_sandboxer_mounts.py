"""Real host mounts (root) of the kind the task proxy makes under a pod's shared directory."""

import errno
import os

import pytest

from host_sandboxer.taskproxy import mounts

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount(2) needs root")


def mount_one(fstype: str, source: str, target, options) -> None:
    """One containerd mount made and attached in this process, as a mountns worker attaches it."""
    fd = mounts.detached(fstype, source, options)
    try:
        mounts.attach(fd, target, directory=not mounts.is_bind(fstype, options) or os.path.isdir(source))
    finally:
        os.close(fd)


def test_overlay_rootfs_and_readonly_bind_then_everything_unmounted(tmp_path):
    lower, upper, work = (tmp_path / n for n in ("lower", "upper", "work"))
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "hello").write_text("from lower")
    shared = tmp_path / "shared"
    shared.mkdir()
    mounts.make_shared_mountpoint(shared)
    rootfs = shared / "c1" / "rootfs"
    rootfs.mkdir(parents=True)
    mount_one("overlay", "overlay", rootfs,
              [f"lowerdir={lower}", f"upperdir={upper}", f"workdir={work}", "index=off"])
    (rootfs / "written").write_text("x")
    data = tmp_path / "data.txt"
    data.write_text("bound")
    target = shared / "c1" / "mounts" / "0"
    mount_one("bind", str(data), target, ["rbind", "ro"])
    try:
        assert (rootfs / "hello").read_text() == "from lower"
        assert (upper / "written").read_text() == "x"
        assert target.read_text() == "bound"
        with pytest.raises(OSError):
            target.write_text("no")
        assert len(mounts.mountpoints_under(shared)) == 3
    finally:
        mounts.unmount_all_under(shared)
    assert mounts.mountpoints_under(shared) == []
    assert not (rootfs / "hello").exists()
    assert data.read_text() == "bound"


def test_missing_bind_source_names_the_path(tmp_path):
    with pytest.raises(mounts.MountError, match="does-not-exist"):
        mount_one("bind", str(tmp_path / "does-not-exist"), tmp_path / "t", ["rbind"])


def test_mount_failure_names_type_source_and_the_option_refused(tmp_path):
    with pytest.raises(mounts.MountError, match=r"overlay overlay: .*lowerdir=/nonexistent"):
        mount_one("overlay", "overlay", tmp_path / "target", ["lowerdir=/nonexistent"])


def test_split_options_separates_flags_from_filesystem_data():
    flags, data = mounts.split_options(["ro", "nosuid", "rprivate", "lowerdir=/a:/b", "index=off"])
    assert flags == mounts.MS_RDONLY | mounts.MS_NOSUID
    assert data == "lowerdir=/a:/b,index=off"


def test_export_is_read_only_but_carries_later_writable_mounts(tmp_path):
    host_side, guest_view, lower, upper, work = (tmp_path / n for n in ("m", "s", "l", "u", "w"))
    for d in (host_side, guest_view, lower, upper, work):
        d.mkdir()
    mounts.make_shared_mountpoint(host_side)
    mounts.export_readonly(host_side, guest_view)
    try:
        (host_side / "c1" / "rootfs").mkdir(parents=True)
        (host_side / "c1" / "config.json").write_text("{}")
        mount_one("overlay", "overlay", host_side / "c1" / "rootfs",
                  [f"lowerdir={lower}", f"upperdir={upper}", f"workdir={work}"])
        assert (guest_view / "c1" / "config.json").read_text() == "{}"
        with pytest.raises(OSError) as info:
            (guest_view / "c1" / "evil").symlink_to("/")
        assert info.value.errno == errno.EROFS
        (guest_view / "c1" / "rootfs" / "written-by-guest").write_text("ok")  # the rootfs is rw
        assert (upper / "written-by-guest").read_text() == "ok"
    finally:
        mounts.unmount_all_under(guest_view)
        mounts.unmount_all_under(host_side)
    assert mounts.mountpoints_under(tmp_path) == []
