"""initrd/reproducible.py's comparison of the cached image with one rebuilt from an empty cache
(the rebuild itself is `make reproducible-check`, in make stress)."""
import copy

from initrd.reproducible import differences

MANIFEST = {
    "kernel": {"sha256": "k1"}, "initrd": {"sha256": "i1"}, "rootfs": {"sha256": "r1"},
    "files": [{"path": "/init", "type": "symlink", "mode": "0o777", "target": "usr/lib/vmm-task/vmm-task"},
              {"path": "/usr/lib/vmm-task/vmm-task", "type": "file", "mode": "0o755", "size": 9, "sha256": "a1"},
              {"path": "/usr/bin/crun", "type": "file", "mode": "0o755", "size": 5, "sha256": "c1"}],
}


def test_the_same_image_has_no_difference():
    assert differences(MANIFEST, copy.deepcopy(MANIFEST)) == []


def test_each_difference_is_named():
    rebuilt = copy.deepcopy(MANIFEST)
    rebuilt["initrd"]["sha256"] = "i2"
    rebuilt["rootfs"]["sha256"] = "r2"  # the pmem root image
    rebuilt["files"][1].update(size=10, sha256="a2")  # a non-reproducible agent binary
    del rebuilt["files"][2]
    rebuilt["files"].append({"path": "/etc/build-date", "type": "file", "mode": "0o644", "size": 1, "sha256": "d"})
    assert differences(MANIFEST, rebuilt) == [
        "initrd sha256 i1 cached, i2 rebuilt",
        "rootfs sha256 r1 cached, r2 rebuilt",
        "/etc/build-date: only in the rebuilt image",
        "/usr/bin/crun: only in the cached image",
        "/usr/lib/vmm-task/vmm-task: sha256, size differ",
    ]
