"""Pod namespaces made by SetupSandbox (root: unshare, bind mounts, a PID-namespace holder: the
real pod-pause, compiled into the cache by initrd.pod_pause).

Runs in a forked subreaper child (see test_agent_reaper.in_child) inside a private mount
namespace, so the bind mounts never reach the host's mount table.
"""

import asyncio
import os
import signal
import socket
import time

import pytest

from test_agent_reaper import in_child

from initrd import pod_pause
from kernel.build import default_cache
from vmm_task.capture import run_capture
from vmm_task.init import syscalls as sc
from vmm_task.pod.namespaces import PodNamespaces
from vmm_task.procfs import count_zombie_children, stat_fields

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)")
POD_PAUSE = str(pod_pause.build(default_cache()))


def private_mounts() -> None:
    sc.unshare(sc.CLONE_NEWNS)
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)


def test_ipc_uts_pid_namespaces_hostname_sysctl_and_holder(tmp_path):
    async def body(reaper):
        private_mounts()
        host_name = socket.gethostname()
        with open("/proc/sys/kernel/shmmni") as f:
            host_shmmni = f.read().strip()
        pod = PodNamespaces(str(tmp_path / "ns"), POD_PAUSE)
        pod.create("pod-host", {"kernel.shmmni": "1234"}, share_pid=True)

        async def run(*argv):
            result = await run_capture(reaper, argv)
            assert result.code == 0, result.stderr
            return result.stdout.decode().strip()

        holder = pod.holder_pid
        seen = {
            "uts": await run("nsenter", f"--uts={pod.paths['uts']}", "hostname"),
            "ipc": await run("nsenter", f"--ipc={pod.paths['ipc']}", "cat",
                             "/proc/sys/kernel/shmmni"),
            "our hostname": socket.gethostname() == host_name,
            "our shmmni": open("/proc/sys/kernel/shmmni").read().strip() == host_shmmni,
            # the agent's thread made them and went back: its later children stay in its PID namespace
            "our pid ns": os.readlink("/proc/thread-self/ns/pid_for_children") == os.readlink("/proc/thread-self/ns/pid"),
            "pid ns": os.stat(pod.paths["pid"]).st_ino == os.stat(f"/proc/{holder}/ns/pid").st_ino,
            "holder": open(f"/proc/{holder}/comm").read().strip(),
            # it is pod-pause itself, not a fork of this Python process keeping a copy of its heap
            "holder exe": os.readlink(f"/proc/{holder}/exe"),
            "holder fds": {fd: os.readlink(f"/proc/{holder}/fd/{fd}")
                           for fd in os.listdir(f"/proc/{holder}/fd")},
            # a process in the pod PID namespace sees the holder as its PID 1
            "pid 1": await run("nsenter", f"--pid={pod.paths['pid']}", "sh", "-c",
                               "cat /proc/1/comm 2>/dev/null; echo $$"),
        }
        # an orphan inside the pod PID namespace is adopted by the holder, its init, and reaped
        # by it once killed: its /proc entry goes (a zombie's would stay)
        await run("nsenter", f"--pid={pod.paths['pid']}", "sh", "-c", "sleep 1000 >/dev/null 2>&1 &")
        [orphan] = children_of(holder)
        os.kill(orphan, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{orphan}") and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        seen["orphan reaped"] = not os.path.exists(f"/proc/{orphan}")
        seen["holder zombies"] = count_zombie_children(holder)
        pod.destroy()
        seen["holder exit"] = (await reaper.wait_pid(holder)).code
        seen["files left"] = sorted(os.listdir(tmp_path / "ns"))
        return seen

    seen = in_child(body)
    assert seen["uts"] == "pod-host" and seen["our hostname"]
    assert seen["ipc"] == "1234" and seen["our shmmni"]
    assert seen["pid ns"] and seen["our pid ns"] and seen["holder"] == "pod-pause"
    assert seen["holder exe"] == POD_PAUSE
    fds = seen["holder fds"]  # stdio, the agent-alive pipe, its signalfd; nothing else
    assert [fds[fd] for fd in "012"] == ["/dev/null"] * 3 and fds["3"].startswith("pipe:")
    assert sorted(fds) == ["0", "1", "2", "3", "4"] and "signalfd" in fds["4"]
    assert seen["pid 1"].split()[-1] == "2"  # nsenter's child is the namespace's second process
    assert seen["orphan reaped"] and seen["holder zombies"] == 0
    assert seen["holder exit"] == 128 + 9
    assert seen["files left"] == []


def test_without_pid_sharing_there_is_no_holder(tmp_path):
    async def body(reaper):
        private_mounts()
        pod = PodNamespaces(str(tmp_path / "ns"), POD_PAUSE)
        pod.create("", {}, share_pid=False)
        result = sorted(pod.paths), pod.holder_pid
        pod.destroy()
        return result

    assert in_child(body) == (["ipc", "uts"], None)


def test_failure_inside_the_thread_is_reported_and_undone(tmp_path):
    async def body(reaper):
        private_mounts()
        pod = PodNamespaces(str(tmp_path / "ns"), POD_PAUSE)
        try:
            pod.create("h", {"kernel.no_such_sysctl_anywhere": "1"}, share_pid=False)
        except ValueError as e:
            return str(e), pod.paths, os.listdir(tmp_path / "ns")
        return None

    assert in_child(body) == ("no sysctl kernel.no_such_sysctl_anywhere", {}, [])


def test_a_missing_pod_pause_is_an_error_naming_it_and_nothing_is_left(tmp_path):
    async def body(reaper):
        private_mounts()
        pod = PodNamespaces(str(tmp_path / "ns"), str(tmp_path / "no-pod-pause"))
        try:
            pod.create("", {}, share_pid=True)
        except OSError as e:
            return str(e), pod.paths, pod.holder_pid, os.listdir(tmp_path / "ns")
        return None

    assert in_child(body) == (
        f"[Errno 2] cannot run the pod's PID-namespace init {tmp_path}/no-pod-pause: "
        "No such file or directory", {}, None, [])


def test_a_namespace_the_agent_cannot_go_back_to_is_an_error_and_the_others_are_entered(tmp_path):
    """setns back into the agent's IPC namespace fails (injected): SetupSandbox's error names it,
    and the UTS and PID ones are entered all the same, so later children are not the pod's."""
    async def body(reaper):
        private_mounts()
        host_name = socket.gethostname()
        real_setns = sc.setns

        def setns(fd, nstype):
            if nstype == sc.CLONE_NEWIPC:
                raise OSError(1, "Operation not permitted (injected)")
            real_setns(fd, nstype)

        sc.setns = setns  # this forked child's module only
        pod = PodNamespaces(str(tmp_path / "ns"), POD_PAUSE)
        try:
            pod.create("pod-host", {}, share_pid=True)
        except OSError as e:
            return (str(e), socket.gethostname() == host_name,
                    os.readlink("/proc/thread-self/ns/pid_for_children") == os.readlink("/proc/thread-self/ns/pid"),
                    pod.paths, pod.holder_pid, os.listdir(tmp_path / "ns"))
        return None

    assert in_child(body) == (
        "the agent could not go back to its own namespaces (ipc: [Errno 1] Operation not permitted "
        "(injected)): its later children would start in the pod's", True, True, {}, None, [])


def test_holder_exits_when_the_agent_dies_without_cleaning_up(tmp_path):
    """Dev mode: a SIGKILLed agent cannot kill its pod-pause holder; the holder notices."""
    async def body(reaper):
        private_mounts()
        pod = PodNamespaces(str(tmp_path / "ns"), POD_PAUSE)
        pod.create("", {}, share_pid=True)
        return pod.holder_pid  # the forked child then exits without destroy()

    holder = in_child(body)
    deadline = time.monotonic() + 5
    while _alive(holder):
        assert time.monotonic() < deadline, f"holder {holder} outlived the agent"
        time.sleep(0.1)


def children_of(parent: int) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(stat_fields(entry)[1]) == parent:
                found.append(int(entry))
        except OSError:  # gone meanwhile
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
