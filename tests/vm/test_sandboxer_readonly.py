"""Read-only volumes and rootfs in a whole pod (issue 13, finding 2; critest's "Container Mount
Readonly" and "ReadOnlyRootfs" specs on our path).

A container writes to its volumes bound with containerd's CRI options (`ro`, `rro`; each with a
tmpfs submount, as critest's specs make them) and to its read-only rootfs, then, privileged, remounts the volumes writable in its own mount namespace
(what a guest root can always do) and writes again: the host's copy of each volume must refuse
(EROFS) and the host files stay as they were. Real daemon, QEMU (TCG), virtiofsd or QEMU's 9p,
crun in the guest; containerd's Events service is the stand-in from test_sandboxer.py.
"""

import json

import pytest
from leak_guard import mounts_left
from test_sandboxer import env  # noqa: F401  (the fixture)
from test_sandboxer import demo

from host_sandboxer.taskproxy.mounts import unmount_all_under
from vmm_common.mount import mount

EROFS = "Read-only file system"
# Each write's outcome: "ok", or the end of the shell's error message.
SCRIPT = """
try() { if out=$(sh -c "echo guest >> $1" 2>&1); then echo "$1: ok"; else echo "$1: ${out##*: }"; fi; }
for p in /ro/file /ro/new /ro/sub/file /rro/file /rro/new /rro/sub/file /in-rootfs; do try $p; done
mount -o remount,bind,rw /ro && mount -o remount,bind,rw /rro && echo remounted
for p in /ro/file /ro/new /rro/file /rro/sub/file; do try $p; done
"""


@pytest.mark.parametrize("env", ["virtiofs", "9p"], indirect=True)
def test_container_cannot_write_its_read_only_volumes(env):
    volumes = env.work / "volumes"
    for name in ("ro", "rro"):
        (volumes / name / "sub").mkdir(parents=True)
        mount("tmpfs", str(volumes / name / "sub"), "tmpfs")
        (volumes / name / "file").write_text("host data\n")
        (volumes / name / "sub" / "file").write_text("host data\n")
    started = env.cri.run_pod("ro-pod")
    b = env.bundle("writer", ["sh", "-c", SCRIPT], started.pid)
    spec = json.loads((b.path / "config.json").read_text())
    spec["root"]["readonly"] = True
    spec["process"]["capabilities"] = {k: v + ["CAP_SYS_ADMIN"] for k, v in spec["process"]["capabilities"].items()}
    spec["mounts"] += [{"destination": f"/{name}", "type": "bind", "source": str(volumes / name),
                        "options": ["rbind", "rprivate", name]} for name in ("ro", "rro")]
    (b.path / "config.json").write_text(json.dumps(spec))
    try:
        out, err, status = demo.run_container(demo.Cri.task_client(started.address), b)
        env.cri.remove_pod("ro-pod")
        host = {str(f.relative_to(volumes)): f.read_text() for f in sorted(volumes.rglob("*")) if f.is_file()}
    finally:
        unmount_all_under(volumes)
    assert (err, status) == (b"", 0), out
    as_guest, _, remounted = out.decode().partition("remounted\n")
    assert dict(line.split(": ", 1) for line in as_guest.splitlines()) == {
        "/ro/file": EROFS, "/ro/new": EROFS,
        "/ro/sub/file": "ok",  # `ro` is not recursive: the host's submount is writable, as on runc
        "/rro/file": EROFS, "/rro/new": EROFS, "/rro/sub/file": EROFS,
        "/in-rootfs": EROFS,
    }, out
    # The container's own mounts made writable: the host's copies still refuse
    assert dict(line.split(": ", 1) for line in remounted.splitlines()) == {
        "/ro/file": EROFS, "/ro/new": EROFS, "/rro/file": EROFS, "/rro/sub/file": EROFS}, out
    assert host == {"ro/file": "host data\n", "ro/sub/file": "host data\nguest\n",
                    "rro/file": "host data\n", "rro/sub/file": "host data\n"}
    assert mounts_left(env.work) == []
