"""Each pod's QEMU gets a uid of its own (containment/uids.py), kept in the pod's record; the
daemon decides it, and the pod's cgroup, at Controller.Create (sandbox/manager.py)."""
import asyncio

import grpc
import pytest
from google.protobuf import any_pb2

from host_sandboxer.config import Config, ContainmentConfig
from host_sandboxer.containment.cgroups import Layout
from host_sandboxer.containment.uids import UidRange, UidRangeError
from host_sandboxer.sandbox.manager import Sandboxes
from host_sandboxer.sandbox.statedir import StateDir
from host_sandboxer.taskproxy.errors import HostError

POD_CONFIG = "type.googleapis.com/runtime.v1.PodSandboxConfig"


def test_the_lowest_free_uid_of_the_range():
    uids = UidRange(1000, 3)
    assert uids.pick(set()) == 1000
    assert uids.pick({1000, 1002}) == 1001
    with pytest.raises(UidRangeError, match="all 3 uids from 1000 are taken"):
        uids.pick({1000, 1001, 1002})


@pytest.mark.parametrize("base, count", [(0, 10), (2**32 - 5, 10)])
def test_a_range_must_fit_between_root_and_the_invalid_uid(base, count):
    with pytest.raises(UidRangeError, match="must lie within"):
        UidRange(base, count)


def _options(cgroup_parent: str) -> any_pb2.Any:
    parent = cgroup_parent.encode()
    linux = b"\x0a" + bytes([len(parent)]) + parent
    return any_pb2.Any(type_url=POD_CONFIG, value=b"\x42" + bytes([len(linux)]) + linux)


class NoCgroups(Sandboxes):
    """Sandboxes whose cgroup layout is given, not probed (no cgroup is made here)."""

    def __init__(self, state, layout):
        super().__init__(state, Config(containment=ContainmentConfig(cgroups=False, vmm_uid_base=5000)), None)
        self.cgroup_layout = layout


def test_pods_get_distinct_uids_and_their_cgroups_and_a_restarted_daemon_reads_both(tmp_path):
    layout = Layout(2, ["/sys/fs/cgroup"])

    async def scenario():
        state = StateDir(tmp_path)
        sandboxes = NoCgroups(state, layout)
        a = sandboxes.create("a", "k8s.io", _options("kubepods-burstable-poda.slice"))
        b = sandboxes.create("b", "k8s.io", any_pb2.Any())
        with pytest.raises(HostError) as bad:
            sandboxes.create("c", "k8s.io", _options("/kubepods/../../etc"))
        recovered = NoCgroups(state, layout)
        await recovered.recover()
        return a, b, bad.value, recovered.pods

    a, b, bad, recovered = asyncio.run(scenario())
    assert (a.vmm_uid, b.vmm_uid) == (5000, 5001)
    assert [str(d) for d in a.cgroup.dirs] == [
        "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-poda.slice/vmm-a"]
    assert [str(d) for d in b.cgroup.dirs] == ["/sys/fs/cgroup/vmm-sandboxer/vmm-b"]
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and "'.' and '..' are not allowed" in bad.message
    assert {pid: (pod.vmm_uid, pod.cgroup.dirs) for pid, pod in recovered.items()} == \
        {"a": (5000, a.cgroup.dirs), "b": (5001, b.cgroup.dirs)}
