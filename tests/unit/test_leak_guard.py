"""The run's leak guard (tests/leak_guard.py) finds what its own run left and nothing of a run
beside it, then takes it away. Real processes, a real bind mount, cgroup and network namespace."""
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from bench.netpair import sh
from leak_guard import RUN_VARIABLE, RunGuard, take_left_in
from vmm_common.mount import MS_BIND, mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts, cgroups and netns need root")

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


def running(pid: int) -> bool:
    """Alive, not a zombie its new parent has yet to reap."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


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


def cgroup_root() -> Path:
    controller = Path("/sys/fs/cgroup/pids")
    return controller if controller.is_dir() else Path("/sys/fs/cgroup")


def found_in_cgroups(guard, cgroups: list[Path]) -> set[Path]:
    """The cgroups (each made, a sleeper put in it, then removed) whose sleeper the guard finds."""
    procs, made = {}, []
    try:
        for cgroup in cgroups:
            made += [d for d in (cgroup.parent, cgroup) if not d.exists()]
            cgroup.mkdir(parents=True)
            procs[cgroup] = sleeper({})
            (cgroup / "cgroup.procs").write_text(str(procs[cgroup].pid))
        pids = set(guard.leftovers(grace_s=0).processes)
        return {cgroup for cgroup, proc in procs.items() if proc.pid in pids}
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
        for directory in reversed(made):
            directory.rmdir()


def test_a_container_is_ours_when_its_cgroup_names_a_bundle_of_the_run(guard):
    """Containers run with their spec's environment: the cgroup (tests/agent's oci_spec) tells."""
    ours, foreign = f"t{uuid.uuid4().hex[:12]}", f"t{uuid.uuid4().hex[:12]}"
    (guard.basetemp / "test_x0" / "bundles" / ours).mkdir(parents=True)
    cgroups = cgroup_root() / "vmm-task-test"
    assert found_in_cgroups(guard, [cgroups / ours, cgroups / foreign]) == {cgroups / ours}


def test_an_e2e_container_is_ours_by_its_pods_cgroup_parent(guard):
    """runc's containers of tests/e2e live under the node's cgroup parent /e2e-<token>-<node>."""
    ours = cgroup_root() / f"e2e-{guard.token}-{uuid.uuid4().hex[:8]}" / "c1"
    foreign = cgroup_root() / f"e2e-0ther0run-{uuid.uuid4().hex[:8]}" / "c1"
    assert found_in_cgroups(guard, [ours, foreign]) == {ours}


def test_take_left_in_takes_what_names_the_directory_or_runs_in_the_cgroup(tmp_path):
    """A fixture's teardown after the product's stop: a helper whose command line names the
    directory, a container's process by its cgroup, a mount under the directory; not others."""
    work = tmp_path / "work"
    (work / "mnt").mkdir(parents=True)
    naming = subprocess.Popen(SLEEP + [f"{work}/qemu.sock"])
    elsewhere = subprocess.Popen(SLEEP + [f"{tmp_path}/other/qemu.sock"])
    for proc in (naming, elsewhere):  # exec'd: the command line is the new one
        while b"qemu.sock" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
            time.sleep(0.01)
    controller = Path("/sys/fs/cgroup/pids")
    cgroups = (controller if controller.is_dir() else Path("/sys/fs/cgroup")) / "vmm-task-test"
    cid = f"t{uuid.uuid4().hex[:12]}"
    (cgroups / cid).mkdir(parents=True)
    contained = sleeper({})
    (cgroups / cid / "cgroup.procs").write_text(str(contained.pid))
    mount("/proc", str(work / "mnt"), None, MS_BIND)
    try:
        found = take_left_in(work, cgroup=f"/vmm-task-test/{cid}", grace_s=0)
        assert set(found.processes) == {naming.pid, contained.pid}
        assert found.mounts == [str(work / "mnt")]
        assert naming.wait(5) < 0 and contained.wait(5) < 0
        assert not running(naming.pid) and elsewhere.poll() is None
        assert not take_left_in(work, cgroup=f"/vmm-task-test/{cid}", grace_s=0)
    finally:
        for proc in (naming, elsewhere, contained):
            proc.kill()
            proc.wait()
        subprocess.run(["umount", "-l", str(work / "mnt")], capture_output=True)
        (cgroups / cid).rmdir()


LEAKY_MODULE = """
import os, subprocess, sys, tempfile, time

def test_leaves_a_process_and_a_temp_dir():
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    tempfile.mkdtemp(prefix="left-")

def test_killed_meanwhile():
    open(os.environ["TEARDOWN_MARK"], "a").write("sleeping\\n")
    time.sleep(60)  # SIGTERM arrives here
"""
TEARDOWN_MARK = """
import os, pytest

@pytest.fixture(autouse=True)
def mark_teardown():
    yield
    open(os.environ["TEARDOWN_MARK"], "a").write("torn down\\n")
"""


def test_a_run_that_leaks_fails_listing_it_and_sigterm_still_tears_down(tmp_path):
    """The real conftest in a pytest of its own: the leak is an error naming the process and
    the temp dir, both gone afterwards; a SIGTERM mid-test ends the run with teardowns done."""
    tests = Path(__file__).resolve().parents[1]
    for name in ("conftest.py", "leak_guard.py"):
        (tmp_path / name).write_text((tests / name).read_text())
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "conftest.py").write_text(TEARDOWN_MARK)
    (tmp_path / "sub" / "test_leaky.py").write_text(LEAKY_MODULE)
    mark = tmp_path / "teardowns"
    env = dict(os.environ, PYTHONPATH=str(tests.parent), TEARDOWN_MARK=str(mark), LEAK_GUARD_GRACE_S="1")
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "--basetemp", str(tmp_path / "base"), "sub"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not (mark.exists() and "sleeping" in mark.read_text()):
        assert run.poll() is None, run.stdout.read()
        time.sleep(0.1)
    run.send_signal(signal.SIGTERM)
    output = run.communicate(timeout=60)[0]
    assert run.returncode != 0
    assert "test_leaky left behind (now removed):" in output, output
    leaked = [line.split()[1].rstrip(":") for line in output.splitlines() if "time.sleep(60)" in line]
    assert len(leaked) == 1 and not running(int(leaked[0]))
    assert "/left-" in output and "KeyboardInterrupt" in output
    assert mark.read_text().count("torn down") == 2  # the killed test's teardown ran too


POD_MODULE = """
import subprocess, sys, time, pytest
from leak_guard import fail_if_left, take_left_in

@pytest.fixture
def pod_dir(tmp_path):
    yield tmp_path
    fail_if_left(take_left_in(tmp_path))

def test_leaves_its_vmm(pod_dir):
    vmm = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"{pod_dir}/qmp.sock"])
    while b"qmp.sock" not in open(f"/proc/{vmm.pid}/cmdline", "rb").read():  # exec'd
        time.sleep(0.01)

def test_stops_its_vmm(pod_dir):
    vmm = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"{pod_dir}/qmp.sock"])
    vmm.terminate()
    vmm.wait()
"""


def test_a_fixture_that_had_to_take_something_fails_its_own_test(tmp_path):
    """Before the module's guard could see it: the teardown error names the test and process."""
    tests = Path(__file__).resolve().parents[1]
    for name in ("conftest.py", "leak_guard.py"):
        (tmp_path / name).write_text((tests / name).read_text())
    (tmp_path / "test_pods.py").write_text(POD_MODULE)
    env = dict(os.environ, PYTHONPATH=str(tests.parent), LEAK_GUARD_GRACE_S="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                          "--basetemp", str(tmp_path / "base"), "test_pods.py"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert "ERROR test_pods.py::test_leaves_its_vmm" in output, output
    assert "PASSED test_pods.py::test_stops_its_vmm" in output, output
    assert "the test left behind (now removed):" in output and "qmp.sock" in output, output
    assert "test_pods left behind" not in output, output  # taken (and reported) by the fixture
