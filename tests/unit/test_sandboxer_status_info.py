"""Controller.Status verbose info as `crictl inspectp` and containerd's CRI read it: every value
must survive crictl's outputStatusData (cri-tools cmd/crictl/util.go) and the "info" key
containerd's setUpdatedResources (internal/cri/server/sandbox_status.go). A Python repr of a
dict (`{'started': 2.3}`) made crictl fail: "unmarshal status info JSON: invalid character '\\''
looking for beginning of object key string"."""

import asyncio
import json
from types import SimpleNamespace

import pytest
from google.protobuf import any_pb2

from host_sandboxer.controller import Controller
from host_sandboxer.sandbox.pod import Container, Pod
from host_sandboxer.sandbox.podconfig import PodConfig
from host_sandboxer.sandbox.statedir import StateDir
from host_sandboxer.taskproxy.bundle import GuestBundle
from host_sandboxer.vmm.vm import BootTimeline
from vmm_common.protos.containerd.services.sandbox.v1 import sandbox_pb2 as sb


def _go_json(text: str):
    """json.loads as strict as Go's encoding/json (no NaN/Infinity)."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def crictl_reads(info: dict[str, str]) -> dict:
    """What crictl makes of each value: a JSON object for one starting with "{" (an error
    otherwise, which fails the whole command), else the string with double quotes trimmed."""
    read = {}
    for key, value in info.items():
        if value.startswith("{"):
            parsed = _go_json(value)
            assert isinstance(parsed, dict), f"{key}: {value!r} is not a JSON object"
            read[key] = parsed
        else:
            read[key] = value.strip('"')
    return read


def check_cri_info(info: dict[str, str]) -> dict:
    """containerd decodes "info" into its SandboxInfo (pid uint32, processStatus string) and
    writes it back: anything else there fails PodSandboxStatus."""
    sandbox_info = _go_json(info["info"])
    assert isinstance(sandbox_info, dict)
    assert isinstance(sandbox_info["pid"], int) and 0 <= sandbox_info["pid"] < 2 ** 32
    assert isinstance(sandbox_info["processStatus"], str)
    return sandbox_info


def _info(tmp_path, *steps) -> dict[str, str]:
    """The info of the daemon's Controller.Status(verbose) for a pod made after `steps(pod)`
    (the servicer called directly: no VM behind the pod)."""
    async def body():
        state_dir = StateDir(tmp_path)
        state_dir.create_sandbox_dir("p1")
        pod = Pod("p1", state_dir, "k8s.io", PodConfig(), any_pb2.Any(), publisher=None)
        for step in steps:
            step(pod)
        controller = Controller(SimpleNamespace(get=lambda sandbox_id: pod))
        request = sb.ControllerStatusRequest(sandbox_id="p1", verbose=True)
        return dict((await controller.Status(request, context=None)).info)
    return asyncio.run(body())


def _booted(pod: Pod) -> None:
    """boot_info as lifecycle.start fills it from the VM's BootTimeline."""
    timeline = BootTimeline(qmp_connected_s=0.21, first_console_s=None, kernel_init_s=1.5,
                            kernel_init_guest_s=0.9, agent_ready_s=3.25, agent_ready_guest_s=None,
                            qemu_cpu_s=2.0, agent_reported={"started": 2.301, "rss": 14.1, "pid": 1.0})
    pod.boot_info.update({"boot_" + k: v for k, v in timeline.as_dict().items()})
    pod.boot_info.update(accel="tcg", vcpus="1", memory_mib="256", transport="hybrid")
    pod.state, pod.vmm_pid = "ready", 4242
    pod.containers = {cid: Container(f"/bundles/{cid}", GuestBundle(pod.mounts_dir, cid)) for cid in ("c2", "c1")}


def test_every_value_of_a_running_pod_reads_back_in_crictl(tmp_path):
    info = _info(tmp_path, _booted)
    read = crictl_reads(info)
    assert read["boot_agent_reported"] == {"started": 2.301, "rss": 14.1, "pid": 1.0}
    assert read["boot_first_console_s"] == "" and read["boot_agent_ready_s"] == "3.25"
    assert (read["state"], read["containers"], read["exit_status"]) == ("ready", "c1,c2", "")
    assert check_cri_info(info) == {"pid": 4242, "processStatus": "running"}


@pytest.mark.parametrize("reason", ["{not json: the VMM died", '{"a": 1}', '"quoted"'])
def test_an_exited_pod_reads_back_whatever_its_reason_says(tmp_path, reason):
    def exited(pod):
        pod.stopping = True  # no exit events to publish
        pod.mark_exited(137, reason)

    info = _info(tmp_path, _booted, exited)
    read = crictl_reads(info)
    assert (read["exit_status"], read["state"]) == ("137", "stopped")
    assert info["exit_reason"] == reason or json.loads(info["exit_reason"]) == reason
    assert check_cri_info(info)["processStatus"] == "stopped"


def test_a_pod_never_started(tmp_path):
    info = _info(tmp_path)
    assert crictl_reads(info)["state"] == "created"
    assert check_cri_info(info) == {"pid": 0, "processStatus": "created"}
