"""What the daemon needs from CRI's PodSandboxConfig (the Any in Controller.Create's options).

Only a few fields matter on the host: the hostname, whether containers share a pod PID
namespace, the pod's resources (they size the VM) and its cgroup parent (where the VM runs:
containment/cgroups.py). Rather than vendoring the whole CRI API, those fields are read with a
small protobuf wire-format reader; field numbers are k8s.io/cri-api runtime.v1's. Any other
options type leaves every value at its default.
"""

import math
from dataclasses import dataclass

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

    def vcpus(self, default: int) -> int:
        if self.cpu_quota > 0 and self.cpu_period > 0:
            return max(default, math.ceil(self.cpu_quota / self.cpu_period))
        return default

    def memory_mib(self, default: int) -> int:
        """The pod's memory limit on top of the default, which the guest system itself uses."""
        return default + math.ceil(self.memory_limit / MIB) if self.memory_limit > 0 else default


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
    )


def _text(value: bytes, what: str) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError as exc:
        raise PodConfigError(f"{what} is not UTF-8: {exc}") from None
