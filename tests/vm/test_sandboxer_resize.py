"""Controller.Update resizes a running pod where it can: a VM started with headroom
(`vm.max_cpus = 2`) gets a hot-added vCPU that the agent onlines and a new container process
sees; more than the headroom is the headroom (clamped, as at Start); memory and fewer vCPUs
are refused naming why.

Real daemon, real QEMU (TCG) with CPU hotplug, real guest kernel, agent and crun.
"""

import json
import os

import grpc
import pytest
from test_sandboxer import NS, _long_running_pod, env  # noqa: F401  (env: the fixture)
from test_sandboxer_restart import _exec

from vmm_common.protos.containerd.services.sandbox.v1 import sandbox_pb2 as sb

pytestmark = [pytest.mark.vm, pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")]
PERIOD = 100_000


def _update(env, sid: str, **resources):
    """Controller.Update with CRI's "updated-resources" extension (UpdatedResources, JSON)."""
    request = sb.ControllerUpdateRequest(sandbox_id=sid, fields=["extensions"])
    extension = request.sandbox.extensions["updated-resources"]
    extension.type_url = "io.containerd.cri.v1.UpdatedResources"
    extension.value = json.dumps({"Overhead": None, "Resources": resources}).encode()
    return env.cri.controller.Update(request, metadata=NS, timeout=90)


def _refusal(env, sid: str, **resources) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        _update(env, sid, **resources)
    return info.value.code(), info.value.details()


@pytest.mark.parametrize("env", [{"settings": {"vm": "max_cpus = 2"}}], indirect=True)
def test_update_hot_adds_a_vcpu_that_containers_see(env):
    started, tasks, b = _long_running_pod(env, "grow")
    assert _exec(tasks, b, "before", ["nproc"]) == (b"1\n", 0)
    _update(env, "grow", cpu_period=PERIOD, cpu_quota=2 * PERIOD)
    assert env.status("grow", verbose=True).info["vcpus"] == "2"
    assert _exec(tasks, b, "after", ["nproc"]) == (b"2\n", 0)
    _update(env, "grow", cpu_period=PERIOD, cpu_quota=2 * PERIOD)  # already that size: nothing to do

    _update(env, "grow", cpu_period=PERIOD, cpu_quota=3 * PERIOD)  # clamped to vm.max_cpus, as at Start
    assert env.status("grow", verbose=True).info["vcpus"] == "2"
    assert _refusal(env, "grow", cpu_period=PERIOD, cpu_quota=PERIOD) == (
        grpc.StatusCode.UNIMPLEMENTED,
        "sandbox grow: cannot resize the running VM: 2 -> 1 vCPUs (vCPUs are not removed); the pod keeps its size")
    got, details = _refusal(env, "grow", cpu_period=PERIOD, cpu_quota=2 * PERIOD, memory_limit_in_bytes=64 << 20)
    assert got == grpc.StatusCode.UNIMPLEMENTED and "memory 512 -> 576 MiB (no memory hotplug)" in details
    assert env.status("grow").state == "SANDBOX_READY"
    env.cri.remove_pod("grow")
