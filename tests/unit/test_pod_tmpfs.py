"""A guest filling what it can write on the host (issue 13, finding 3).

The pod's `mounts/` is a bounded tmpfs (containment/pod_tmpfs.py), set up as lifecycle.start
does, under a `--dir` that is a small tmpfs of its own (as /run is). A container's bundle is
prepared by the real GuestBundle, and the test writes as the guest does through the share:
into `shared/<container>/`, the bundle bound writable. It gets ENOSPC (bytes, then inodes),
the --dir filesystem loses nothing, and the container's Delete (Pod.remove_container) leaves
the daemon's loop free while it removes what the guest wrote.
"""
import asyncio
import errno
import json
import os
import time
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from host_sandboxer.containment.pod_tmpfs import mount_pod_tmpfs
from host_sandboxer.sandbox.pod import Container, Pod
from host_sandboxer.sandbox.podconfig import PodConfig
from host_sandboxer.sandbox.statedir import StateDir
from host_sandboxer.taskproxy import mounts
from host_sandboxer.taskproxy.bundle import GuestBundle
from vmm_common.mount import mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount(2) needs root")

SIZE_MIB, INODES = 8, 40_000
LOOP_LAG_LIMIT_S = 0.1


@pytest.fixture
def run_dir(tmp_path):
    """A 256 MiB tmpfs standing in for /run, where --dir lives."""
    run = tmp_path / "run"
    run.mkdir()
    mount("tmpfs", str(run), "tmpfs", 0, "size=256m")
    yield run
    mounts.unmount_all_under(run)


def _room(path: Path) -> tuple[int, int]:
    st = os.statvfs(path)
    return st.f_bfree, st.f_ffree


def _fill_with_files(directory: Path) -> tuple[int, int]:
    """Empty files until the filesystem refuses: (how many, the errno)."""
    for n in range(10**7):
        try:
            os.close(os.open(directory / f"f{n}", os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError as exc:
            return n, exc.errno
    raise AssertionError("never refused")


def _fill_with_bytes(path: Path) -> tuple[int, int]:
    written, chunk = 0, b"x" * (1 << 20)
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                written += f.write(chunk)
            except OSError as exc:
                return written, exc.errno


def test_a_guest_filling_its_area_gets_enospc_the_host_loses_nothing_and_delete_leaves_the_loop_free(run_dir):
    async def scenario():
        state = StateDir(run_dir / "state")
        pod = Pod("p1", state, "k8s.io", PodConfig(), any_pb2.Any(), publisher=None)
        state.create_sandbox_dir("p1")
        for directory in (pod.mounts_dir, pod.shared_dir):
            directory.mkdir(mode=0o700)
        mount_pod_tmpfs(pod.mounts_dir, SIZE_MIB, INODES)  # as lifecycle.start does
        mounts.make_shared_mountpoint(pod.mounts_dir)
        mounts.export_readonly(pod.mounts_dir, pod.shared_dir)
        host_bundle = run_dir / "bundle"
        (host_bundle / "rootfs").mkdir(parents=True)
        (host_bundle / "config.json").write_text(json.dumps({"ociVersion": "1.3.0", "root": {"path": "rootfs"}}))
        bundle = GuestBundle(pod.mounts_dir, "c1")
        bundle.prepare(str(host_bundle), [], {})
        pod.containers["c1"] = Container(str(host_bundle), bundle)
        guest_view = pod.shared_dir / "c1"
        before = _room(run_dir)

        written, size_errno = _fill_with_bytes(guest_view / "big")
        (guest_view / "big").unlink()
        created, inode_errno = _fill_with_files(guest_view)
        after = _room(run_dir)

        ticks = [time.monotonic()]

        async def ticker():
            while True:
                await asyncio.sleep(0.005)
                ticks.append(time.monotonic())

        ticking = asyncio.create_task(ticker())
        await pod.remove_container("c1")
        ticks.append(time.monotonic())
        ticking.cancel()
        delete_s = ticks[-1] - ticks[0]
        lag = max(later - earlier for earlier, later in zip(ticks, ticks[1:])) - 0.005
        left = mounts.mountpoints_under(pod.dir)
        mounts.unmount_all_under(pod.dir)
        return written, size_errno, created, inode_errno, before, after, delete_s, lag, left

    written, size_errno, created, inode_errno, before, after, delete_s, lag, left = asyncio.run(scenario())
    assert size_errno == errno.ENOSPC and written <= SIZE_MIB << 20
    assert inode_errno == errno.ENOSPC and INODES - 100 < created < INODES
    assert after == before, "the --dir filesystem gave the guest nothing"
    print(f"Delete of {created} guest files: {delete_s:.3f} s, loop lag at most {lag * 1000:.1f} ms")
    assert lag < LOOP_LAG_LIMIT_S
    assert sorted(left) == [str(run_dir / "state" / "p1" / name) for name in ("mounts", "shared")]
