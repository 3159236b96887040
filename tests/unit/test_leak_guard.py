"""The run's leak guard (tests/leak_guard.py) finds what its own run left and nothing of a run
beside it, then takes it away. Real processes, a real bind mount, cgroup and network namespace."""
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from bench.netpair import sh
from leak_guard import RUN_VARIABLE, RunGuard
from vmm_common.mount import MS_BIND, mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts, cgroups and netns need root")

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


def sleeper(env: dict) -> subprocess.Popen:
    return subprocess.Popen(SLEEP, env={"PATH": os.environ["PATH"], **env})


@pytest.fixture
def guard(tmp_path):
    made = RunGuard(uuid.uuid4().hex[:8], tmp_path / "base", tmp_path / "tmp")
    made.basetemp.mkdir()
    made.tmp_dir.mkdir()
    return made


def test_finds_its_runs_processes_mounts_netns_and_files_only(guard):
    ours = sleeper({RUN_VARIABLE: guard.token})
    other_run = sleeper({RUN_VARIABLE: "0ther0run"})
    unmarked = sleeper({})
    left_file = guard.tmp_dir / "vsk-left"
    (left_file / "mnt").mkdir(parents=True)
    mount("/proc", str(left_file / "mnt"), None, MS_BIND)
    netns = f"vmmt-{guard.token}-0000-pod"
    sh("ip", "netns", "add", netns)
    try:
        found = guard.leftovers(grace_s=0)
        assert set(found.processes) == {ours.pid} and "time.sleep(60)" in found.processes[ours.pid]
        assert found.mounts == [str(left_file / "mnt")]
        assert found.netns == [netns] and found.files == [str(left_file)]
        report = found.report()
        assert f"process {ours.pid}:" in report and f"mount {left_file / 'mnt'}" in report
        assert f"network namespace {netns}" in report

        guard.clear(found)
        assert ours.wait(5) < 0
        assert not guard.leftovers(grace_s=0)
        assert other_run.poll() is None and unmarked.poll() is None  # not ours: left running
    finally:
        for proc in (ours, other_run, unmarked):
            proc.kill()
            proc.wait()
        subprocess.run(["umount", "-l", str(left_file / "mnt")], capture_output=True)
        sh("ip", "netns", "del", netns, check=False)


def test_a_container_is_ours_when_its_cgroup_names_a_bundle_of_the_run(guard):
    """Containers run with their spec's environment: the cgroup (tests/agent's oci_spec) tells."""
    controller = Path("/sys/fs/cgroup/pids")
    cgroups = (controller if controller.is_dir() else Path("/sys/fs/cgroup")) / "vmm-task-test"
    ours, foreign = f"t{uuid.uuid4().hex[:12]}", f"t{uuid.uuid4().hex[:12]}"
    (guard.basetemp / "test_x0" / "bundles" / ours).mkdir(parents=True)
    procs = {}
    try:
        for cid in (ours, foreign):
            (cgroups / cid).mkdir(parents=True)
            procs[cid] = sleeper({})
            (cgroups / cid / "cgroup.procs").write_text(str(procs[cid].pid))
        assert set(guard.leftovers(grace_s=0).processes) == {procs[ours].pid}
    finally:
        for cid, proc in procs.items():
            proc.kill()
            proc.wait()
        for cid in (ours, foreign):
            if (cgroups / cid).exists():
                (cgroups / cid).rmdir()
