"""Controller.Update: what of it a pod's VM can take.

containerd keeps the sandbox record (labels, spec, extensions) itself; none of that changes the
VM, so such an update is simply accepted. A new size is another matter. containerd's CRI
records a pod's new resources (UpdatePodSandboxResources, in-place pod resize) as the sandbox
extension "updated-resources" (Go type io.containerd.cri.v1.UpdatedResources, JSON
`{"Overhead": {...}, "Resources": {"cpu_period", "cpu_quota", "memory_limit_in_bytes", ...}}`);
upstream containerd 2.x stores it and does not pass it on, but a client's Update may carry it.
The size it asks for is computed as at Start (podconfig.py), clamped to the same maxima (a size
beyond `vm.max_cpus` is the maximum, as Start would give it). A running VM started with headroom
(`vm.max_cpus`) grows by vCPU hotplug: QMP `device_add`, then the agent onlines the new vCPUs
(vmm_task/init/cpu_hotplug.py) and the update returns once the guest reports them online.
Anything else is refused with a status naming what cannot be done, never acknowledged and
ignored: other memory (no memory hotplug yet), fewer vCPUs, more than the headroom, a pod not
running.
"""

import asyncio
import json
import logging

import grpc
from google.protobuf import empty_pb2

from host_sandboxer.sandbox.podconfig import PodConfig
from host_sandboxer.taskproxy.errors import HostError
from host_sandboxer.vmm.qemu import QemuError
from vmm_common import ttrpc
from vmm_common.protos.vmmtask.v1 import health_pb2

log = logging.getLogger(__name__)

UPDATED_RESOURCES = "updated-resources"
HEALTH_SERVICE = "vmmtask.v1.Health"
ONLINE_TIMEOUT_S = 20.0  # a hot-added vCPU's bring-up in a TCG guest under load


async def apply_update(pod, request, vm_config) -> None:
    """Resize the pod's VM to what `request` (a ControllerUpdateRequest) asks, if it asks;
    raise HostError for what cannot be done."""
    wanted = requested_size(request, vm_config, pod.id)
    if wanted is None:
        return
    cpus, memory = wanted
    # After a daemon restart boot_info is new: the memory is then what Start sized from the pod.
    booted_memory = int(pod.boot_info.get("memory_mib") or pod.pod_config.memory_mib(vm_config))
    if pod.state != "ready" or pod.vm_exited.done() or pod.vm is None:
        if wanted == (pod.pod_config.vcpus(vm_config), booted_memory):
            return  # what Start gives it anyway
        raise HostError(grpc.StatusCode.FAILED_PRECONDITION,
                        f"sandbox {pod.id} is not running ({pod.state}): only a running VM is resized")
    try:
        current = await pod.vm.qemu.vcpus()
    except QemuError as exc:
        raise HostError(grpc.StatusCode.UNAVAILABLE, f"sandbox {pod.id}: {exc}") from None
    if memory != booted_memory:
        raise _unsupported(pod, f"memory {booted_memory} -> {memory} MiB (no memory hotplug)")
    if cpus < current:
        raise _unsupported(pod, f"{current} -> {cpus} vCPUs (vCPUs are not removed)")
    if cpus > current:
        try:
            await pod.vm.qemu.add_vcpus(cpus - current)
        except QemuError as exc:
            raise HostError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"sandbox {pod.id}: cannot grow from {current} to {cpus} vCPUs: {exc}") from None
    await _until_online(pod, cpus)  # also when a retry finds them added: done once they are online
    pod.boot_info["vcpus"] = str(cpus)


def requested_size(request, vm_config, pod_id: str) -> tuple[int, int] | None:
    """(vCPUs, MiB) the update's new pod resources ask for, sized as at Start; None if it
    carries none (or its `fields` leave the extensions out)."""
    if request.fields and not any(f == "extensions" or f.startswith("extensions.") for f in request.fields):
        return None
    update = request.sandbox.extensions.get(UPDATED_RESOURCES)
    if update is None:
        return None
    try:
        resources = json.loads(update.value or b"{}").get("Resources") or {}
        config = PodConfig(cpu_quota=int(resources.get("cpu_quota", 0)),
                           cpu_period=int(resources.get("cpu_period", 0)),
                           memory_limit=int(resources.get("memory_limit_in_bytes", 0)))
    except (ValueError, TypeError, AttributeError) as exc:
        raise HostError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"extension {UPDATED_RESOURCES!r} is not UpdatedResources JSON: {exc}") from None
    if config.clamped(vm_config):
        log.warning("sandbox %s: update clamped: %s", pod_id, config.clamped(vm_config))
    return config.vcpus(vm_config), config.memory_mib(vm_config)


def _unsupported(pod, what: str) -> HostError:
    return HostError(grpc.StatusCode.UNIMPLEMENTED,
                     f"sandbox {pod.id}: cannot resize the running VM: {what}; the pod keeps its size")


async def _until_online(pod, cpus: int) -> None:
    """Wait (bounded) until the agent reports `cpus` vCPUs online."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ONLINE_TIMEOUT_S
    online = 0
    while loop.time() < deadline:
        try:
            status = await pod.agent_call(HEALTH_SERVICE, "Status", empty_pb2.Empty(),
                                          health_pb2.StatusResponse, timeout=ONLINE_TIMEOUT_S)
        except (ConnectionError, ttrpc.RpcError) as exc:
            raise HostError(grpc.StatusCode.UNAVAILABLE,
                            f"sandbox {pod.id}: {cpus} vCPUs added, but the agent did not report: {exc}") from None
        online = status.online_cpus
        if online >= cpus:
            return
        await asyncio.sleep(0.1)
    raise HostError(grpc.StatusCode.UNAVAILABLE,
                    f"sandbox {pod.id}: {cpus} vCPUs added, but the guest has {online} online after "
                    f"{ONLINE_TIMEOUT_S:g} s")
