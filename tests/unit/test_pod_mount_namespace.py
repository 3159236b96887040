"""The pods' mounts live in the pods' mount namespace (host_sandboxer/mountns), not the host's.

critest's read-only mount specs remove the hostPath (a tmpfs submount in it, first unmounted)
while the container still runs. A bind of the volume made in the host's namespace holds the
submount's mount point there: unlinkat gave EBUSY on vmm, not on runc, whose binds are in the
container's namespace. Here on real mounts (root): GuestBundle.prepare as the daemon runs it,
through the worker into a pinned namespace, and, for contrast, in this process' own namespace.
"""

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from host_sandboxer.containment.launch import Confinement, wrap
from host_sandboxer.mountns.space import Here, Pinned
from host_sandboxer.taskproxy import mounts
from host_sandboxer.taskproxy.bundle import GuestBundle
from vmm_common.mount import mount, umount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount(2) needs root")

CID = "c1"


class Node:
    def __init__(self, root: Path, space):
        self.root, self.space = root, space
        self.state = root / "state"
        self.pod = self.state / "pod"
        self.host = root / "host"  # a shared mount, as a systemd host's `/`
        self.volume = self.host / "volume"
        self.bundle = root / "bundle"

    def prepare(self, options) -> GuestBundle:
        spec = {"ociVersion": "1.3.0", "root": {"path": "rootfs"},
                "mounts": [{"destination": "/data", "type": "bind", "source": str(self.volume), "options": options}]}
        (self.bundle / "config.json").write_text(json.dumps(spec))
        bundle = GuestBundle(self.pod / "mounts", CID, self.space)
        bundle.prepare(str(self.bundle), [], {})
        return bundle

    def pod_mounts(self) -> list[str]:
        """Mount points under the pod, in the pods' mount namespace."""
        return self.space.run("mountpoints", str(self.pod))


@pytest.fixture(params=["pinned"])
def node(request, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    space = Pinned(state) if request.param == "pinned" else Here()
    if request.param == "pinned":
        space.ensure()
    n = Node(tmp_path, space)
    (n.bundle / "rootfs").mkdir(parents=True)
    n.host.mkdir()
    mounts.make_shared_mountpoint(n.host)
    (n.volume / "tmpfs").mkdir(parents=True)
    mount("tmpfs", str(n.volume / "tmpfs"), "tmpfs")
    (n.volume / "tmpfs" / "file").write_text("host data")
    space.run("pod_setup", str(n.pod / "mounts"), str(n.pod / "shared"), 16, 1000)
    yield n
    space.run("teardown", str(n.pod))
    if request.param == "pinned":
        space.release()
    mounts.unmount_all_under(tmp_path)


def remove_volume(n: Node) -> str:
    """What critest's cleanup does: unmount the hostPath's tmpfs, remove the hostPath."""
    umount(str(n.volume / "tmpfs"))
    try:
        shutil.rmtree(n.volume)
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "removed"


@pytest.mark.parametrize("node", ["pinned", "here"], indirect=True)
@pytest.mark.parametrize("options", [["rbind", "rprivate", "ro"], ["rbind", "rprivate", "rro"]])
def test_the_host_removes_a_volume_a_running_container_has(node, options):
    bundle = node.prepare(options)
    try:
        removed = remove_volume(node)
        in_pod = node.pod_mounts()
    finally:
        bundle.cleanup()
    # in the pods' namespace the submount point's mount is detached by the host's rmdir
    assert removed == ("removed" if isinstance(node.space, Pinned) else "EBUSY")
    assert f"{node.pod}/mounts/{CID}/mounts/0" in in_pod


def test_the_hosts_mount_table_shows_only_the_pin(node):
    bundle = node.prepare(["rbind", "rprivate", "ro"])
    try:
        host = mounts.mountpoints_under(node.state)
        in_pod = node.pod_mounts()
    finally:
        bundle.cleanup()
    assert host == [f"{node.state}/.mntns/ns", f"{node.state}/.mntns"]
    assert {f"{node.pod}/mounts", f"{node.pod}/shared", f"{node.pod}/shared/{CID}/mounts/0/tmpfs"} <= set(in_pod)
    assert node.space.run("mountpoints", str(node.pod / "mounts" / CID)) == []


def test_rslave_gets_what_the_host_mounts_later(node):
    """CRI's HostToContainer: a mount the host makes under the volume after the container was
    created reaches the pod's `shared/` (what virtiofsd serves) in the pods' namespace."""
    later = node.volume / "later"
    later.mkdir()
    bundle = node.prepare(["rbind", "rslave", "ro"])
    mount("tmpfs", str(later), "tmpfs")
    (later / "made-later").write_text("x")
    try:
        in_pod = node.pod_mounts()
        seen = subprocess.run(wrap(["ls", f"{node.pod}/shared/{CID}/mounts/0/later"],
                                   Confinement(mount_namespace=node.space.namespace_file)),
                              capture_output=True, text=True, timeout=30).stdout
    finally:
        bundle.cleanup()
    assert f"{node.pod}/shared/{CID}/mounts/0/later" in in_pod
    assert seen.split() == ["made-later"]


def test_a_helper_started_in_the_namespace_sees_the_bundle(node):
    """virtiofsd (and QEMU serving 9p) start there (containment/launch.py) and see the pod's
    shared directory as the guest must; the host sees an empty directory."""
    bundle = node.prepare(["rbind", "rprivate", "ro"])
    try:
        command = ["cat", f"{node.pod}/shared/{CID}/mounts/0/tmpfs/file"]
        inside = subprocess.run(wrap(command, Confinement(mount_namespace=node.space.namespace_file)),
                                capture_output=True, text=True, timeout=30)
        on_host = list((node.pod / "shared").iterdir())
    finally:
        bundle.cleanup()
    assert (inside.stdout, on_host) == ("host data", [])


def test_a_restarted_daemon_finds_the_same_namespace(node):
    bundle = node.prepare(["rbind", "rprivate", "ro"])
    try:
        again = Pinned(node.state)
        again.ensure()
        same = os.stat(again.namespace_file).st_ino == os.stat(node.space.namespace_file).st_ino
        seen = again.run("mountpoints", str(node.pod / "mounts" / CID))
    finally:
        bundle.cleanup()
    assert same and f"{node.pod}/mounts/{CID}/mounts/0" in seen


def test_a_bundle_that_exists_is_refused_and_kept(node):
    bundle = node.prepare(["rbind", "rprivate", "ro"])
    try:
        with pytest.raises(Exception, match="already has a bundle"):
            node.prepare(["rbind", "rprivate", "ro"])
        kept = node.space.run("mountpoints", str(node.pod / "mounts" / CID))
    finally:
        bundle.cleanup()
    assert f"{node.pod}/mounts/{CID}/mounts/0" in kept
