"""Read-only volumes stay read-only in every view the guest can reach (issue 13, finding 2).

The daemon binds a container's volume into the pod's `mounts/` (a shared mount point), which
propagates into `shared/` (what QEMU's 9p serves from the host's namespace) and into
virtiofsd's own mount namespace. Here the real GuestBundle.prepare does that on real mounts
(root), and writes are tried from the host's `shared/` and from a namespace made the way
virtiofsd makes its own (unshare CLONE_NEWNS, everything made a slave, the shared directory
bound on itself), made before the container's volumes were bound (virtiofsd starts with the
pod) or after; there also under the bundle's own bind, made after the volumes': a guest that
looked the bundle directory up before that bind covered it reaches what is under it through
virtiofsd's handle. And every copy of a read-only volume's mount in those namespaces, covered
or not, must be read-only.

OCI semantics, as runc gives them: `ro` is read-only at the top only (a submount keeps its own
flags: critest's "non-recursive readonly mounts" writes into one), `rro` is read-only all the
way down.
"""

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from host_sandboxer.taskproxy import mounts
from host_sandboxer.taskproxy.bundle import GuestBundle
from vmm_common.mount import mount, umount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount(2) needs root")

CID = "c1"
# containerd 2.4's CRI options for a hostPath volume (WithMounts): readOnly → rbind,rprivate,ro;
# recursiveReadOnly: Enabled → rbind,rprivate,rro (it demands private propagation for rro).
VOLUMES = [("/ro", "vol-ro", "ro"), ("/rro", "vol-rro", "rro"), ("/rw", "vol-rw", "rw"),
           ("/etc/hosts", "hosts", "ro")]
# What each write must give, by spec mount (n of `<view>/c1/mounts/n`) and path in it.
EXPECTED = {
    "0/file": errno.EROFS, "0/new": errno.EROFS,
    "0/sub/file": 0,  # `ro` is not recursive: the submount keeps its own (rw) flags, as on runc
    "1/file": errno.EROFS, "1/new": errno.EROFS, "1/sub/file": errno.EROFS,
    "2/file": 0, "2/new": 0,  # the contrast: these paths do reach the volumes
    "3": errno.EROFS,
}
# Tries each write; prints {path: errno or 0}. Run in the namespace of the view under test.
PROBE = """
import json, sys
result = {}
for path in sys.argv[1:]:
    try:
        with open(path, "x" if "/new-" in path else "a") as f:
            f.write("written through a read-only volume")
        result[path] = 0
    except OSError as exc:
        result[path] = exc.errno
print(json.dumps(result))
"""


class VirtiofsdLikeNamespace:
    """A process in a mount namespace made as virtiofsd (QEMU 7.2) makes its sandbox: unshare,
    `/` made a recursive slave, the shared directory bound on itself."""

    def __init__(self, shared: Path):
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "slave", "sh", "-c",
             'mount --rbind "$0" "$0" && echo ready && exec sleep 600', str(shared)],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "ready\n"

    def uncover(self, path: Path):
        """Detach, in this namespace, the mount on `path`: what is under it is what virtiofsd
        reaches through a handle the guest got by looking `path` up before it was covered."""
        subprocess.run(["nsenter", f"--mount=/proc/{self.proc.pid}/ns/mnt", "--", "umount", "-l", str(path)],
                       check=True, timeout=30)

    def close(self):
        self.proc.kill()
        self.proc.wait()


def write_results(view: Path, tag: str, namespace_pid: int | None = None) -> dict[str, str]:
    """EXPECTED's writes tried in `view`: {key: errno name, or "ok"}. New files are named
    after `tag` (an existing name would give EEXIST, not EROFS)."""
    paths = {key: f"{view}/{CID}/mounts/{key}".replace("/new", f"/new-{tag}") for key in EXPECTED}
    errnos = write_errnos(list(paths.values()), namespace_pid)
    return {key: errno.errorcode.get(errnos[path], "ok") for key, path in paths.items()}


def write_errnos(paths: list[str], namespace_pid: int | None = None) -> dict[str, int]:
    """PROBE's writes of `paths` ("/new-" in a name: created), in that process' mount namespace."""
    enter = ["nsenter", f"--mount=/proc/{namespace_pid}/ns/mnt", "--"] if namespace_pid else []
    out = subprocess.run([*enter, sys.executable, "-c", PROBE, *paths], check=True,
                         capture_output=True, text=True, timeout=30).stdout
    return json.loads(out)


def writable_copies(pod: Path, namespace_pid: int | str) -> list[str]:
    """Mount points (under `pod`) in that namespace of a read-only volume's mounts that are
    writable: the top of `ro` volumes (0, 3), anything of the `rro` one (1); covered mounts
    included."""
    found = set()
    for line in Path(f"/proc/{namespace_pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        point, flags = fields[4], fields[5].split(",")
        match = re.search(rf"/{CID}/mounts/(\d+)(/.*)?$", point)
        if point.startswith(str(pod)) and match and "rw" in flags:
            number, below = match.groups()
            if number == "1" or (number in ("0", "3") and not below):
                found.add(os.path.relpath(point, pod))
    return sorted(found)


@pytest.fixture
def pod(tmp_path):
    """A pod's `mounts/` and `shared/` as lifecycle.start makes them, a bundle dir, and in
    `host/`, a shared mount as a systemd host's `/` is, volumes: `vol-ro` and `vol-rro` with a
    tmpfs submount `sub`, `vol-rw`, and a file `hosts`."""
    mounts_dir, shared, host = tmp_path / "pod" / "mounts", tmp_path / "pod" / "shared", tmp_path / "host"
    for d in (mounts_dir, shared, host, tmp_path / "bundle" / "rootfs"):
        d.mkdir(parents=True)
    mounts.make_shared_mountpoint(mounts_dir)
    mounts.export_readonly(mounts_dir, shared)
    mounts.make_shared_mountpoint(host)
    for name in ("vol-ro", "vol-rro", "vol-rw"):
        (host / name / "sub").mkdir(parents=True)
        (host / name / "file").write_text("host data")
    for name in ("vol-ro", "vol-rro"):
        mount("tmpfs", str(host / name / "sub"), "tmpfs")
        (host / name / "sub" / "file").write_text("submount data")
    (host / "hosts").write_text("host data")
    yield tmp_path
    for d in (shared, mounts_dir, host):
        mounts.unmount_all_under(d)


def prepare(pod: Path, volumes) -> GuestBundle:
    """GuestBundle.prepare of a spec binding `volumes` ((destination, source in host/,
    options) each), as the daemon does it for a Task.Create."""
    spec = {"ociVersion": "1.3.0", "root": {"path": "rootfs"},
            "mounts": [{"destination": destination, "type": "bind", "source": str(pod / "host" / source),
                        "options": options} for destination, source, options in volumes]}
    (pod / "bundle" / "config.json").write_text(json.dumps(spec))
    bundle = GuestBundle(pod / "pod" / "mounts", CID)
    bundle.prepare(str(pod / "bundle"), [], {})
    return bundle


@pytest.mark.parametrize("namespace_made", ["before", "after"])
def test_read_only_volumes_are_read_only_in_every_view(pod, namespace_made):
    shared = pod / "pod" / "shared"
    namespace = VirtiofsdLikeNamespace(shared) if namespace_made == "before" else None
    bundle = prepare(pod, [(destination, source, ["rbind", "rprivate", mode]) for destination, source, mode in VOLUMES])
    try:
        if namespace is None:
            namespace = VirtiofsdLikeNamespace(shared)
        virtiofsd = f"virtiofsd namespace made {namespace_made}"
        got = {"host mounts/": write_results(pod / "pod" / "mounts", "m"),
               "host shared/ (9p)": write_results(shared, "s"),
               virtiofsd: write_results(shared, "v", namespace.proc.pid)}
        namespace.uncover(shared / CID)  # the bundle's own writable bind, made after the volumes'
        got[virtiofsd + ", under the bundle's bind"] = write_results(shared, "u", namespace.proc.pid)
        writable = {"host": writable_copies(pod, "self"), virtiofsd: writable_copies(pod, namespace.proc.pid)}
    finally:
        namespace.close()
        bundle.cleanup()
    want = {key: errno.errorcode.get(e, "ok") for key, e in EXPECTED.items()}
    wrong = [f"{view}: mounts/{key}: {result} (want {want[key]})"
             for view, results in got.items() for key, result in results.items() if result != want[key]]
    wrong += [f"{view}: writable mount of a read-only volume at {point}"
              for view, points in writable.items() for point in points]
    assert not wrong, "read-only volumes that are not:\n" + "\n".join(wrong)
    host = pod / "host"
    assert [(host / f).read_text() for f in ("vol-ro/file", "vol-rro/file", "hosts")] == ["host data"] * 3
    assert sorted(p.name for p in (host / "vol-ro").iterdir()) == ["file", "sub"]
    assert (host / "vol-rro" / "sub" / "file").read_text() == "submount data"


def test_the_guest_spec_gives_a_ro_volumes_submount_a_writable_bind(pod):
    """In the guest a volume is one mount: the submount of the `ro` one gets its own bind there
    (the host's copy of it decides, as on runc); the `rro` one's stays under the `rro`."""
    bundle = prepare(pod, [(destination, source, ["rbind", "rprivate", mode]) for destination, source, mode in VOLUMES])
    try:
        spec = json.loads((bundle.host_dir / "config.json").read_text())
    finally:
        bundle.cleanup()
    guest = f"/run/kuasar/state/{CID}/mounts"
    assert [(m["destination"], m["source"], m["options"][-1]) for m in spec["mounts"]] == [
        ("/ro", f"{guest}/0", "ro"), ("/ro/sub", f"{guest}/0/sub", "rw"), ("/rro", f"{guest}/1", "rro"),
        ("/rw", f"{guest}/2", "rw"), ("/etc/hosts", f"{guest}/3", "ro")]


def test_deleting_the_container_leaves_the_hosts_own_mounts(pod):
    """The bundle's copies of a volume are unmounted on Delete; the host's submounts of the
    volume (its mount a shared one) stay: a copy that stayed a peer would take them along."""
    host = pod / "host"
    bundle = prepare(pod, [(destination, source, ["rbind", "rprivate", mode]) for destination, source, mode in VOLUMES])
    bundle.cleanup()
    assert not bundle.host_dir.exists()
    assert [mounts.is_mountpoint(host / v / "sub") for v in ("vol-ro", "vol-rro")] == [True, True]


@pytest.mark.parametrize("options, arrives", [
    (["rbind", "rprivate", "rro"], False), (["rbind", "rprivate", "ro"], False),
    (["rbind", "rslave", "ro"], True),  # CRI's HostToContainer: the host's later mounts arrive
])
def test_what_the_host_mounts_later_under_a_volume(pod, options, arrives):
    """A recursively read-only volume is private (a mount arriving later would be writable),
    so is a plain one by default; with rslave the host's later mounts reach the guest."""
    later = pod / "host" / "vol-rro" / "later"
    later.mkdir()
    bundle = prepare(pod, [("/data", "vol-rro", options)])
    mount("tmpfs", str(later), "tmpfs")
    try:
        arrived = mounts.is_mountpoint(pod / "pod" / "shared" / CID / "mounts" / "0" / "later")
    finally:
        bundle.cleanup()
    assert arrived == arrives
