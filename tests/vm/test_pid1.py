"""vmm-task as PID 1 of the real guest image (QEMU TCG, hybrid vsock): the ready line, bad
`task.*` values reported without stopping the boot, orphans reaped, TERM/INT/HUP/PIPE/USR1/USR2
sent to PID 1 survived, the pod's namespaces,
SyncClock moving the guest clock both ways, and cgroup v1 + 9p when the command line asks.

The guest has no shell: commands run through ExecVMProcess (boot with task.debug) using a copy
of the host's static busybox placed in the shared directory (/run/kuasar/state in the guest).
"""

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from vmm_common import ttrpc
from vmm_common.protos.kuasar import sandbox_pb2 as pb
from vmm_common.protos.vmmtask.v1 import health_pb2 as health_pb

SANDBOX = "grpc.SandboxService"
HEALTH = "vmmtask.v1.Health"
BUSYBOX = "/run/kuasar/state/busybox"


def booted_with_busybox(vm_factory, tmp_path: Path, *params: str, **options):
    share = tmp_path / "share"
    share.mkdir()
    shutil.copy("/bin/busybox", share / "busybox")
    return vm_factory(kernel_params=["task.debug", *params], share_dir=share, **options)


def guest(vm, command: str) -> str:
    """Run `busybox <command>` in the guest; its stdout."""
    reply = vm.call(SANDBOX, "ExecVMProcess", pb.ExecVMProcessRequest(
        command=f"{BUSYBOX} {command}"), pb.ExecVMProcessResponse, timeout=30)
    return reply.out


def status(vm) -> health_pb.StatusResponse:
    return vm.call(HEALTH, "Status", empty_pb2.Empty(), health_pb.StatusResponse)


def test_pid1_ready_line_bad_parameters_orphan_reaping_and_signals(vm_factory, tmp_path):
    vm = booted_with_busybox(vm_factory, tmp_path, "task.log_level=loud", "task.frobnicate=1")
    console = vm.console_text()
    ready = [line for line in console.splitlines() if "vmm-task ready" in line]
    assert len(ready) == 1, console[-3000:]
    print(ready[0], *[line for line in console.splitlines() if "steps took" in line])  # -s
    fields = dict(word.split("=") for word in ready[0].split() if "=" in word)
    started, ready_at = float(fields["started"].rstrip("s")), float(fields["ready"].rstrip("s"))
    assert 0 < started <= ready_at < 60
    assert fields["pid"] == "1" and float(fields["rss"].rstrip("MB")) > 1
    # bad task.* values: named on the console and in Status, and the boot went on
    assert "task.log_level='loud'" in console and "unknown parameter task.frobnicate" in console
    state = status(vm)
    assert state.pid == 1 and state.debug
    assert any("task.log_level" in p for p in state.boot_problems)
    version = vm.call(HEALTH, "Version", empty_pb2.Empty(), health_pb.VersionResponse)
    assert version.mode == "pid1"

    # an orphaned grandchild: busybox sh starts a sleep in the background and exits at once
    orphan = int(guest(vm, "sh -c '/run/kuasar/state/busybox sleep 300 & echo $!'"))
    parent = guest(vm, f"cat /proc/{orphan}/stat").rsplit(")", 1)[1].split()[1]
    assert parent == "1"
    reaped_before = status(vm).reaped_total
    guest(vm, f"kill -9 {orphan}")
    deadline = time.monotonic() + 20
    while guest(vm, f"sh -c 'test -e /proc/{orphan} && echo zombie || echo gone'") != "gone\n":
        assert time.monotonic() < deadline, f"pid {orphan} stayed a zombie"
        time.sleep(0.2)
    after = status(vm)
    assert after.zombies == 0 and after.reaped_total > reaped_before

    # signals to PID 1: each handled one is logged as it arrives; SIGPIPE is ignored (SigIgn)
    assert int(guest(vm, "grep SigIgn /proc/1/status").split()[1], 16) & (1 << (signal.SIGPIPE - 1))
    for name in ("TERM", "INT", "HUP", "PIPE", "USR1", "USR2"):
        guest(vm, f"kill -{name} 1")
        if name != "PIPE":
            line = f"received SIG{name}: PID 1 keeps running"
            deadline = time.monotonic() + 20
            while line not in vm.console_text():
                assert time.monotonic() < deadline, f"no {line!r} on the console"
                time.sleep(0.2)
        survived = status(vm)  # the same agent: a PID 1 that exits panics the kernel
        assert (survived.pid, survived.started_at_uptime_s) == (1, after.started_at_uptime_s), name
    assert "Kernel panic" not in vm.console_text()


def check_pod_pause(vm, holder: str) -> None:
    """The pod's PID-namespace holder is the image's pod-pause, not a fork of the agent (whose
    copy of the agent's heap held 7-11 MB of RssAnon), and it reaps the pod's orphans."""
    assert guest(vm, f"readlink /proc/{holder}/exe") == "/usr/sbin/pod-pause\n"
    status = dict(line.split(":", 1) for line in guest(vm, f"cat /proc/{holder}/status").splitlines())
    rss_anon_kb = int(status["RssAnon"].split()[0])
    print(f"pod-pause RssAnon {rss_anon_kb} kB")  # -s
    assert rss_anon_kb < 512, status
    # an orphan in the pod's PID namespace (its parent sh exits at once) is the holder's child;
    # killed, it is reaped: its /proc entry goes (a zombie's would stay)
    guest(vm, f"nsenter --pid=/run/sandbox-ns/pid {BUSYBOX} sh -c "
              f"'{BUSYBOX} sleep 1000 >/dev/null 2>&1 &'")
    [orphan] = guest(vm, f"sh -c 'for p in /proc/[0-9]*; do {BUSYBOX} grep -qx "
                         f"\"PPid:[[:space:]]*{holder}\" $p/status && echo ${{p#/proc/}}; done; true'"
                     ).split()
    guest(vm, f"kill -9 {orphan}")
    deadline = time.monotonic() + 30
    while guest(vm, f"sh -c '[ -e /proc/{orphan} ] && echo zombie; true'"):
        assert time.monotonic() < deadline, f"orphan {orphan} was not reaped"
        time.sleep(0.2)


def test_mounts_pod_namespaces_and_clock_in_the_guest(vm_factory, tmp_path):
    vm = booted_with_busybox(vm_factory, tmp_path)
    mounts = {line.split()[1]: line.split()[2]
              for line in guest(vm, "cat /proc/mounts").splitlines()}
    for target, fstype in (("/proc", "proc"), ("/sys", "sysfs"), ("/dev", "devtmpfs"),
                           ("/dev/pts", "devpts"), ("/dev/shm", "tmpfs"), ("/run", "tmpfs"),
                           ("/sys/fs/cgroup", "cgroup2"), ("/run/kuasar/state", "virtiofs")):
        assert mounts.get(target) == fstype, (target, mounts)
    assert "memory" in guest(vm, "cat /sys/fs/cgroup/cgroup.subtree_control")
    assert guest(vm, "cat /sys/class/net/lo/operstate") in ("unknown\n", "up\n")

    request = pb.SetupSandboxRequest()
    request.config.type_url = "PodSandboxConfig"
    request.config.value = json.dumps({"hostname": "pod-in-vm", "linux": {
        "sysctls": {"kernel.msgmax": "5555", "vm.overcommit_memory": "1"}}}).encode()
    vm.call(SANDBOX, "SetupSandbox", request, empty_pb2.Empty, timeout=30)
    assert sorted(guest(vm, "ls /run/sandbox-ns").split()) == ["ipc", "pid", "uts"]
    holder = guest(vm, f"sh -c 'for p in /proc/[0-9]*; do {BUSYBOX} grep -l pod-pause $p/comm;"
                       " done; true'")
    assert holder.count("/comm") == 1
    check_pod_pause(vm, holder.split("/")[2])
    assert guest(vm, "cat /proc/sys/vm/overcommit_memory") == "1\n"  # global: the VM's own
    assert guest(vm, "hostname") != "pod-in-vm\n"  # only the pod's UTS namespace has it
    assert guest(vm, f"nsenter --uts=/run/sandbox-ns/uts {BUSYBOX} hostname") == "pod-in-vm\n"
    assert guest(vm, f"nsenter --ipc=/run/sandbox-ns/ipc {BUSYBOX} cat "
                     "/proc/sys/kernel/msgmax") == "5555\n"

    # pyroute2 (imported on first use) works in the compiled agent: lo stands in for a NIC
    vm.call(SANDBOX, "UpdateInterfaces", pb.UpdateInterfacesRequest(interfaces=[pb.Interface(
        name="lo", device="lo", mtu=65000, IPAddresses=[
            pb.IPAddress(address="127.0.0.1", mask="8"),
            pb.IPAddress(address="127.0.0.53", mask="255.0.0.0")])]), empty_pb2.Empty, timeout=60)
    vm.call(SANDBOX, "UpdateRoutes", pb.UpdateRoutesRequest(routes=[
        pb.Route(dest="10.200.0.0/16", device="lo", scope=253)]), empty_pb2.Empty, timeout=60)
    addresses = guest(vm, "ip addr show lo")
    assert "mtu 65000" in addresses and "inet 127.0.0.53/8" in addresses
    assert "10.200.0.0/16 dev lo scope link" in guest(vm, "ip route")

    def guest_offset_s() -> float:
        sent = time.time_ns()
        reply = vm.call(SANDBOX, "SyncClock", pb.SyncClockPacket(ClientSendTime=sent),
                        pb.SyncClockPacket)
        return (reply.ServerSendTime - (sent + time.time_ns()) / 2) / 1e9

    start = guest_offset_s()
    moved = []
    for delta_s in (-86400, 86400):  # a day back, then forward again
        vm.call(SANDBOX, "SyncClock", pb.SyncClockPacket(Delta=delta_s * 10**9),
                pb.SyncClockPacket)
        moved.append(guest_offset_s() - start)
    assert abs(moved[0] + 86400) < 30 and abs(moved[1]) < 30, moved
    with pytest.raises(ttrpc.RpcError) as before_1970:
        vm.call(SANDBOX, "SyncClock", pb.SyncClockPacket(Delta=-(2**62)), pb.SyncClockPacket)
    assert before_1970.value.code == ttrpc.Code.INVALID_ARGUMENT


def test_cgroup_v1_and_9p_on_request(vm_factory, tmp_path):
    vm = booted_with_busybox(vm_factory, tmp_path, "task.cgroup=v1", sharefs="9p")
    mounts = guest(vm, "cat /proc/mounts").splitlines()
    by_target = {line.split()[1]: line.split() for line in mounts}
    assert by_target["/run/kuasar/state"][2] == "9p"
    assert by_target["/sys/fs/cgroup"][2] == "tmpfs"
    assert by_target["/sys/fs/cgroup/memory"][2] == "cgroup"
    assert by_target["/sys/fs/cgroup/cpu,cpuacct"][2] == "cgroup"
    assert guest(vm, "cat /sys/fs/cgroup/memory/memory.use_hierarchy") == "1\n"
    assert status(vm).boot_problems == []
