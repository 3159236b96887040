"""What the daemon needs from CRI's PodSandboxConfig (the Any in Controller.Create's options).

Only a few fields matter on the host: the hostname, whether containers share a pod PID
namespace, the pod's resources (they size the VM), its cgroup parent (where the VM runs:
containment/cgroups.py) and its user namespace options (refused before a VM boots where a runc
pod is refused: vmm_common/userns.py). Rather than vendoring the whole CRI API, those fields are read with a
small protobuf wire-format reader; field numbers are k8s.io/cri-api runtime.v1's. Any other
options type leaves every value at its default.

The VM's size is clamped to the configured maxima (`vm.max_cpus`, `vm.max_memory_mib`;
unset: the host's CPUs and RAM), not refused: a Kubernetes limit is a ceiling that may exceed
the node (limits are not what the scheduler admits by), and runc runs such a pod, so refusing
would leave a pod the node accepted unable to start. A VM as large as the limit would cost what
it promises: guest RAM the guest kernel maps and fills with page cache, and vCPUs beyond the
host's. The pod's cgroup (kubelet's) still enforces the limit itself.
"""

import math
import os
from dataclasses import dataclass
from typing import Optional

from vmm_common.userns import IDMapping, UserNamespace

POD_SANDBOX_CONFIG = "runtime.v1.PodSandboxConfig"
NAMESPACE_MODE_POD = 0  # runtime.v1.NamespaceMode.POD
MIB = 1024 * 1024


class PodConfigError(ValueError):
    """The options Any claims to be a PodSandboxConfig but does not decode."""


@dataclass(frozen=True)
class PodConfig:
    hostname: str = ""
    shared_pid: bool = False
    cpu_quota: int = 0
    cpu_period: int = 0
    memory_limit: int = 0
    cgroup_parent: str = ""  # linux.cgroup_parent: the pod's cgroup (kubelet's), "" if none
    userns: Optional[UserNamespace] = None  # namespace_options.userns_options, None if unset

    def asked_cpus(self) -> int:
        """The CPU limit in whole vCPUs (0: none)."""
        return math.ceil(self.cpu_quota / self.cpu_period) if self.cpu_quota > 0 and self.cpu_period > 0 else 0

    def asked_memory_mib(self, vm) -> int:
        """The memory limit on top of `vm.memory_mib`, which the guest system itself uses (0: none)."""
        return vm.memory_mib + math.ceil(self.memory_limit / MIB) if self.memory_limit > 0 else 0

    def vcpus(self, vm) -> int:
        """The VM's vCPUs (`vm`: the [vm] config): what the limit asks, between `vm.cpus` and the maximum."""
        return max(vm.cpus, min(self.asked_cpus(), max_cpus(vm)))

    def memory_mib(self, vm) -> int:
        """The VM's RAM: what the limit asks, between `vm.memory_mib` and the maximum."""
        return max(vm.memory_mib, min(self.asked_memory_mib(vm), max_memory_mib(vm)))

    def clamped(self, vm) -> str:
        """What the maxima cut from the limits, in words ("": nothing)."""
        cut = [f"{self.asked_cpus()} vCPUs to {max_cpus(vm)} (vm.max_cpus)"
               if self.asked_cpus() > max_cpus(vm) else "",
               f"{self.asked_memory_mib(vm)} MiB to {max_memory_mib(vm)} (vm.max_memory_mib)"
               if self.asked_memory_mib(vm) > max_memory_mib(vm) else ""]
        return ", ".join(part for part in cut if part)


def max_cpus(vm) -> int:
    """The most vCPUs a pod gets: `vm.max_cpus`, else the host's CPUs (never below `vm.cpus`)."""
    return max(vm.cpus, vm.max_cpus or os.cpu_count() or 1)


def max_memory_mib(vm) -> int:
    """The most guest RAM a pod gets: `vm.max_memory_mib`, else the host's RAM."""
    return max(vm.memory_mib, vm.max_memory_mib or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // MIB)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise PodConfigError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def fields(data: bytes) -> dict[int, list]:
    """Top-level fields of one message: number → values (int or bytes), in order."""
    out: dict[int, list] = {}
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise PodConfigError("length-delimited field runs past the end")
            value, pos = data[pos:pos + length], pos + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = int.from_bytes(data[pos:pos + size], "little"), pos + size
        else:
            raise PodConfigError(f"unsupported wire type {wire} in field {number}")
        out.setdefault(number, []).append(value)
    return out


def _last(msg: dict, number: int, default):
    values = msg.get(number)
    return values[-1] if values else default


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def parse_pod_config(type_url: str, value: bytes) -> PodConfig:
    if not type_url.endswith("/" + POD_SANDBOX_CONFIG) and type_url != POD_SANDBOX_CONFIG:
        return PodConfig()
    config = fields(value)
    linux = fields(_last(config, 8, b""))
    security = fields(_last(linux, 2, b""))
    namespaces = fields(_last(security, 1, b""))
    resources = fields(_last(linux, 5, b""))
    return PodConfig(
        hostname=_text(_last(config, 2, b""), "hostname"),
        # proto3 omits zero: an absent pid mode is POD (shared), as CRI reads it.
        shared_pid=_last(namespaces, 2, NAMESPACE_MODE_POD) == NAMESPACE_MODE_POD,
        cpu_period=_signed(_last(resources, 1, 0)),
        cpu_quota=_signed(_last(resources, 2, 0)),
        memory_limit=_signed(_last(resources, 4, 0)),
        cgroup_parent=_text(_last(linux, 1, b""), "linux.cgroup_parent"),
        userns=_userns(namespaces),
    )


def _userns(namespaces: dict) -> Optional[UserNamespace]:
    """NamespaceOption.userns_options (5): mode 1, uids 2, gids 3; IDMapping: host_id 1,
    container_id 2, length 3."""
    if 5 not in namespaces:
        return None
    options = fields(_last(namespaces, 5, b""))

    def mappings(number: int) -> list[IDMapping]:
        decoded = [fields(entry) for entry in options.get(number, [])]
        return [IDMapping(_last(m, 2, 0), _last(m, 1, 0), _last(m, 3, 0)) for m in decoded]

    return UserNamespace(_last(options, 1, 0), mappings(2), mappings(3))


def _text(value: bytes, what: str) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError as exc:
        raise PodConfigError(f"{what} is not UTF-8: {exc}") from None
