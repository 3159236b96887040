"""Pod and helper cgroups (containment/cgroups.py) on the real cgroup filesystem (root).

This machine has systemd's hybrid layout: the controllers on v1 hierarchies, a v2 hierarchy
without controllers at /sys/fs/cgroup/unified. The probed layout (v1) is what the daemon uses
here; the v2 code runs on that unified hierarchy (making, joining, cgroup.kill, removal; not
controllers, which it has none of).
"""
import asyncio
import os
import uuid
from pathlib import Path

import pytest

from host_sandboxer.containment import cgroups
from host_sandboxer.containment.cgroups import Cgroup, CgroupError, Layout
from host_sandboxer.containment.launch import Confinement
from host_sandboxer.vmm import process
from host_sandboxer.vmm.helper_output import HelperOutput

UNIFIED = Path("/sys/fs/cgroup/unified")


@pytest.mark.parametrize("parent, path", [
    ("/kubepods/burstable/pod1", "kubepods/burstable/pod1"),
    ("kubepods", "kubepods"),
    ("kubepods-burstable-pod1.slice", "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice"),
    ("system.slice", "system.slice"),
    ("-.slice", ""),
    ("/", ""),
])
def test_parents_as_kubelet_gives_them(parent, path):
    assert cgroups.expand_parent(parent) == path


def test_a_pod_without_a_parent_runs_under_the_daemons():
    assert cgroups.pod_path("", "/vmm-sandboxer", "p1") == "vmm-sandboxer/vmm-p1"
    assert cgroups.pod_path("kubepods-pod1.slice", "/vmm-sandboxer", "p1") == "kubepods.slice/kubepods-pod1.slice/vmm-p1"
    assert cgroups.helpers_path("-.slice") == "vmm-helpers"


@pytest.mark.parametrize("parent", ["/kubepods/../etc", "a/./b", "kubepods--x.slice", "-kubepods.slice"])
def test_parents_that_could_leave_the_hierarchy_or_are_no_slice_are_refused(parent):
    with pytest.raises(CgroupError, match="cgroup parent"):
        cgroups.expand_parent(parent)


def _layouts():
    layouts = []
    if os.geteuid() == 0:
        layouts.append(pytest.param(Layout.probe(), id=f"probed-v{Layout.probe().version}"))
        if (UNIFIED / "cgroup.procs").exists() and Layout.probe().roots != (UNIFIED,):
            layouts.append(pytest.param(Layout(2, [UNIFIED]), id="v2-unified"))
    return layouts


@pytest.fixture
def parent():
    """A parent of our own, removed with what is left in it."""
    name = f"vmm-test-{uuid.uuid4().hex[:8]}"
    yield name
    for root in {*Layout.probe().roots, UNIFIED}:
        for directory in sorted((root / name).glob("**/"), key=lambda p: -len(p.parts)):
            directory.rmdir()


pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the cgroup filesystem is root's")


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@pytest.mark.parametrize("layout", _layouts())
def test_a_helper_is_in_its_cgroup_from_its_first_instruction_and_removal_kills_what_is_left(layout, parent):
    cgroup = Cgroup.at(layout, f"{parent}/kubepods.slice/vmm-p1")
    cgroup.create()
    assert all(d.is_dir() for d in cgroup.dirs) and len(cgroup.dirs) == len(layout.roots)

    async def scenario():
        # The helper prints its cgroups as it starts, then leaves a child behind and sleeps.
        output = HelperOutput(Path(f"/tmp/{parent}.log"))
        proc = await process.spawn(["sh", "-c", "cat /proc/self/cgroup; sleep 60 & exec sleep 60"], output,
                                   confinement=Confinement(cgroup_procs=cgroup.procs_files))
        deadline = asyncio.get_running_loop().time() + 10
        while asyncio.get_running_loop().time() < deadline:  # until cat is done, both sleeps run
            members, first_lines = cgroup.pids(), output.tail(100)
            if len(members) == 2 and first_lines and all(_comm(pid) == "sleep" for pid in members):
                break
            await asyncio.sleep(0.01)
        await cgroup.remove()
        status = await proc.wait()
        output.remove()
        return proc.pid, members, first_lines, status

    pid, members, first_lines, status = asyncio.run(scenario())
    assert pid in members and len(members) == 2  # the helper and its child
    relative = "/" + str(cgroup.dirs[0].relative_to(layout.roots[0]))
    joined = [line for line in first_lines.splitlines() if line.endswith(f":{relative}")]
    assert len(joined) == len(layout.roots), first_lines  # one line per hierarchy ("0::/…" on v2)
    assert status == -9
    assert not any(d.exists() for d in cgroup.dirs)


def test_a_new_v1_cpuset_cgroup_gets_its_parents_cpus(parent):
    layout = Layout.probe()
    if layout.version != 1:
        pytest.skip("cgroup v2 host")
    cgroup = Cgroup.at(layout, f"{parent}/a/b")
    cgroup.create()
    cpuset = next(d for d in cgroup.dirs if (d / "cpuset.cpus").exists())
    root = next(r for r in layout.roots if (r / "cpuset.cpus").exists())
    for level in (cpuset, cpuset.parent, cpuset.parent.parent):
        assert (level / "cpuset.cpus").read_text() == (root / "cpuset.cpus").read_text()
    asyncio.run(cgroup.remove())


def test_a_record_names_the_same_cgroup(parent):
    cgroup = Cgroup.at(Layout.probe(), f"{parent}/vmm-p1")
    again = Cgroup.from_record(cgroup.record())
    assert (again.version, again.dirs) == (cgroup.version, cgroup.dirs)
    assert Cgroup.from_record(None) is None
