"""Controller.Update: what of it a pod's VM can take.

containerd keeps the sandbox record (labels, spec, extensions) itself; none of that changes the
VM, so such an update is simply accepted. A new size is another matter. containerd's CRI
records a pod's new resources (UpdatePodSandboxResources, in-place pod resize) as the sandbox
extension "updated-resources" (Go type io.containerd.cri.v1.UpdatedResources, JSON
`{"Overhead": {...}, "Resources": {"cpu_period", "cpu_quota", "memory_limit_in_bytes", ...}}`);
upstream containerd 2.x stores it and does not pass it on, but a client's Update may carry it.
The VM is sized from the pod's resources at Start (podconfig.py) and cannot be resized while
it runs (no vCPU or memory hotplug yet: docs/containerd.md), so an update asking for another
size is refused with UNIMPLEMENTED rather than acknowledged and ignored.
"""

import json

import grpc

from host_sandboxer.sandbox.podconfig import PodConfig
from host_sandboxer.taskproxy.errors import HostError

UPDATED_RESOURCES = "updated-resources"


def check_update(pod, request, vm_config) -> None:
    """Raise HostError unless `request` (a ControllerUpdateRequest) leaves the VM's size as it is."""
    wanted = requested_size(request, vm_config)
    if wanted is None:
        return
    current = current_size(pod, vm_config)
    if wanted != current:
        raise HostError(grpc.StatusCode.UNIMPLEMENTED,
                        f"sandbox {pod.id}: resizing the VM ({current[0]} vCPUs, {current[1]} MiB -> "
                        f"{wanted[0]} vCPUs, {wanted[1]} MiB) is not supported: no vCPU or memory "
                        "hotplug; the pod keeps its size")


def requested_size(request, vm_config) -> tuple[int, int] | None:
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
    return config.vcpus(vm_config.cpus), config.memory_mib(vm_config.memory_mib)


def current_size(pod, vm_config) -> tuple[int, int]:
    """(vCPUs, MiB) of the pod's VM: as booted, or as Start will boot it."""
    if "vcpus" in pod.boot_info:
        return int(pod.boot_info["vcpus"]), int(pod.boot_info["memory_mib"])
    return pod.pod_config.vcpus(vm_config.cpus), pod.pod_config.memory_mib(vm_config.memory_mib)
