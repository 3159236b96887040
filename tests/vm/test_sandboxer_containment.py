"""A pod's VM runs confined (issue 13, finding 6): sized no larger than the configured maxima;
QEMU and virtiofsd in a cgroup under the pod's cgroup_parent, charged there; QEMU as a uid of
its own without capabilities, with its seccomp filter; virtiofsd with the capabilities its
sandbox needs only; the vsock backend and the FIFO keepers without capabilities in the daemon's
helpers cgroup, the backend as a uid of its own. A restarted daemon finds the pod's cgroup, and
Shutdown removes it.

Real daemon, real QEMU (TCG), virtiofsd, vsock backend, guest and crun.
"""
import asyncio
import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest
from google.protobuf import any_pb2
from test_sandboxer import NS, demo, env  # noqa: F401  (env: the fixture)
from test_sandboxer_restart import _crash_daemon, _gone

from host_sandboxer.config import ContainmentConfig
from host_sandboxer.containment.cgroups import Cgroup, Layout
from host_sandboxer.vmm.virtiofsd import CAPABILITIES as VIRTIOFSD_CAPABILITIES
from vmm_common.protos.containerd.services.sandbox.v1 import sandbox_pb2 as sb
from vmm_common.protos.containerd.task.v3 import shim_pb2 as task

pytestmark = [pytest.mark.vm, pytest.mark.skipif(os.geteuid() != 0, reason="mounts and cgroups need root")]
CAP_BITS = {"chown": 0, "dac_override": 1, "fowner": 3, "fsetid": 4, "setgid": 6, "setuid": 7, "setpcap": 8,
            "mknod": 27, "setfcap": 31, "sys_admin": 21, "sys_resource": 24}
MIB = 1 << 20


def _varint(value: int) -> bytes:
    out = b""
    while value > 0x7F:
        out, value = out + bytes([value & 0x7F | 0x80]), value >> 7
    return out + bytes([value])


def _options(hostname: str, cgroup_parent: str, cpus: int) -> any_pb2.Any:
    """CRI's PodSandboxConfig with `hostname` (field 2), linux.cgroup_parent (8.1) and a CPU
    limit of `cpus` (8.5: cpu_period 1, cpu_quota 2)."""
    name, parent = hostname.encode(), cgroup_parent.encode()
    resources = b"\x08" + _varint(100_000) + b"\x10" + _varint(cpus * 100_000)
    linux = b"\x0a" + bytes([len(parent)]) + parent + b"\x2a" + bytes([len(resources)]) + resources
    return any_pb2.Any(type_url="type.googleapis.com/runtime.v1.PodSandboxConfig",
                       value=b"\x12" + bytes([len(name)]) + name + b"\x42" + bytes([len(linux)]) + linux)


def _status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())


def _in_cgroup(pid: int, path: str) -> bool:
    """Whether every hierarchy the daemon uses puts `pid` at `path`."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return sum(line.endswith(f":/{path}") for line in lines) == len(Layout.probe().roots)


def _keepers(env) -> list[int]:
    mark = b"vmm-stdio-keeper " + bytes(env.daemon.state)
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if mark in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def _memory_charged(cgroup: Cgroup) -> int:
    for directory in cgroup.dirs:
        for name in ("memory.usage_in_bytes", "memory.current"):  # v1, v2
            if (directory / name).exists():
                return int((directory / name).read_text())
    raise AssertionError("no memory controller")


@pytest.mark.parametrize("env", [{"settings": {"vm": "max_cpus = 1"}}], indirect=True)
def test_a_pods_vm_runs_confined_and_its_cgroup_outlives_a_daemon_restart(env):
    slice_prefix = f"vmmt{uuid.uuid4().hex[:8]}"
    parent_path = f"{slice_prefix}.slice/{slice_prefix}-pod1.slice"
    pod_path = f"{parent_path}/vmm-conf"
    layout = Layout.probe()
    cgroup = Cgroup.at(layout, pod_path)
    try:
        env.cri.controller.Create(sb.ControllerCreateRequest(
            sandbox_id="conf", options=_options("conf", f"{slice_prefix}-pod1.slice", cpus=4)), metadata=NS, timeout=10)
        started = env.cri.controller.Start(sb.ControllerStartRequest(sandbox_id="conf"), metadata=NS, timeout=120)
        info = env.status("conf", verbose=True).info
        assert (info["vcpus"], info["clamped"]) == ("1", "4 vCPUs to 1 (vm.max_cpus)")
        record = json.loads((env.daemon.state / "conf" / "state.json").read_text())
        qemu, virtiofsd = started.pid, record["vm"]["virtiofsd"]["pid"]

        # QEMU and virtiofsd (and its sandboxed child) are in the pod's cgroup, nothing else.
        members = cgroup.pids()
        assert {qemu, virtiofsd} < members and len(members) == 3, members
        assert all(_in_cgroup(pid, pod_path) for pid in members)
        assert _memory_charged(cgroup) > 32 * MIB, "the guest's RAM is charged to the pod"

        seen = _status(qemu)
        assert seen["Uid"].split() == [str(ContainmentConfig().vmm_uid_base)] * 4
        assert seen["Gid"].split()[0] == str(ContainmentConfig().vmm_uid_base)
        assert (seen["CapEff"], seen["CapBnd"], seen["NoNewPrivs"], seen["Seccomp"]) == ("0" * 16, "0" * 16, "1", "2")
        given = sum(1 << CAP_BITS[cap] for cap in VIRTIOFSD_CAPABILITIES)
        for pid in members - {qemu}:  # virtiofsd drops even these itself once it has its sandbox
            seen = _status(pid)
            assert int(seen["CapBnd"], 16) & ~given == 0 and seen["NoNewPrivs"] == "1"

        # A container runs (the sockets QEMU got open work); its FIFO keepers and the vsock
        # backend are in the helpers' cgroup, without capabilities.
        tasks = demo.Cri.task_client(started.address)
        b = env.bundle("conf-c", ["sh", "-c", "echo up; exec sleep 1000"], started.pid)
        out = b.fifo("out")
        reader = demo.FifoReader(out)
        tasks.Create(task.CreateTaskRequest(id=b.id, bundle=str(b.path), rootfs=b.rootfs, stdout=out),
                     metadata=NS, timeout=60)
        tasks.Start(task.StartRequest(id=b.id), metadata=NS, timeout=60)
        backend = json.loads((env.daemon.state / "vsock-backend.json").read_text())["pid"]
        deadline = time.monotonic() + 30
        while not (keepers := _keepers(env)) and time.monotonic() < deadline:
            time.sleep(0.1)
        helpers = f"{env.daemon.cgroup_parent}/vmm-helpers"
        assert keepers and all(_in_cgroup(pid, helpers) for pid in [backend, *keepers])
        assert all(_status(pid)["CapEff"] == "0" * 16 and _status(pid)["NoNewPrivs"] == "1"
                   for pid in [backend, *keepers])
        assert _status(backend)["Uid"].split() == [str(ContainmentConfig().backend_uid)] * 4

        # A restarted daemon takes the pod over; Shutdown removes the cgroup it recorded.
        _crash_daemon(env)
        env.daemon.start()
        assert env.status("conf").state == "SANDBOX_READY"
        tasks.Kill(task.KillRequest(id=b.id, signal=signal.SIGKILL, all=True), metadata=NS, timeout=10)
        tasks.Wait(task.WaitRequest(id=b.id), metadata=NS, timeout=60)
        tasks.Delete(task.DeleteRequest(id=b.id), metadata=NS, timeout=60)
        assert reader.result() == b"up\n"
        env.cri.remove_pod("conf")
        assert _gone(members)
        assert not any(d.exists() for d in cgroup.dirs)
        assert all((root / parent_path).is_dir() for root in layout.roots), "kubelet's pod cgroup is kubelet's"
    finally:
        for root in layout.roots:
            for directory in sorted((root / f"{slice_prefix}.slice").glob("**/"), key=lambda p: -len(p.parts)):
                asyncio.run(Cgroup(layout.version, [directory]).remove())
