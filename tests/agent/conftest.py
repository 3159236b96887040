"""Fixtures for dev-mode agent tests: the real agent (`vmm-task --listen unix://...`) as root on
this host, real crun, and a busybox rootfs built from Debian's busybox-static.

The runtime is the guest's (pinned Debian 13 packages, initrd/guest_runtime.py) made runnable
on this host, not the host's own: Debian 12's crun 1.8.1 refuses the `ociVersion` containerd
2.4 writes (1.3.0), which the specs here carry.

    def test_x(agent, bundles):
        async def body(t):                        # t: TaskClient connected to the agent
            b = bundles.make(["sh", "-c", "echo hi"])
            await t.create(b, stdout=str(b.path / "out"))
            ...
        agent.run(body)

Each test gets its own bundles (overlay rootfs over the shared busybox tree, as containerd
would mount it) and container IDs unique to the test, so tests may run beside other users
of crun on the machine.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from host_sandboxer.taskproxy.mounts import mountpoints_under, unmount_all_under
from initrd import guest_runtime, pod_pause
from leak_guard import CONTAINER_CGROUP, Leftovers, fail_if_left, take_left_in
from vmm_common import ttrpc
from vmm_common.protos.containerd.events import task_pb2 as events_pb
from vmm_common.protos.containerd.services.ttrpc.events.v1 import events_pb2 as envelope_pb
from vmm_common.protos.containerd.task.v2 import shim_pb2 as pb
from vmm_common.protos.containerd.types import mount_pb2

REPO = Path(__file__).resolve().parents[2]
BUSYBOX = Path("/bin/busybox")
TASK = "containerd.task.v2.Task"
AGENT_START_TIMEOUT = 30.0
# crun by default; VMM_TASK_TEST_RUNTIME=runc runs the same tests with runc
RUNTIME_NAME = os.environ.get("VMM_TASK_TEST_RUNTIME", "crun")

RESPONSES = {
    "State": pb.StateResponse, "Create": pb.CreateTaskResponse, "Start": pb.StartResponse,
    "Delete": pb.DeleteResponse, "Pids": pb.PidsResponse, "Wait": pb.WaitResponse,
    "Stats": pb.StatsResponse, "Connect": pb.ConnectResponse,
}


def _cache_dir() -> Path:
    root = Path(os.environ.get("VMM_TASK_CACHE", Path.home() / ".cache" / "vmm-task"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def busybox_rootfs() -> Path:
    """A read-only busybox tree (every applet linked), cached by the busybox binary's hash."""
    if os.geteuid() != 0:
        pytest.skip("agent tests run containers: root needed")
    if not BUSYBOX.exists():
        pytest.fail("/bin/busybox missing: busybox-static belongs in scripts/apt-packages.txt")
    digest = hashlib.sha256(BUSYBOX.read_bytes()).hexdigest()[:16]
    rootfs = _cache_dir() / f"busybox-rootfs-{digest}"
    if rootfs.exists():
        return rootfs
    tmp = rootfs.with_name(rootfs.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for d in ("bin", "proc", "sys", "dev", "tmp", "etc", "root"):
        (tmp / d).mkdir(parents=True)
    shutil.copy2(BUSYBOX, tmp / "bin" / "busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (tmp / "bin" / applet).symlink_to("busybox")
    (tmp / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tmp / "etc" / "group").write_text("root:x:0:\n")
    tmp.rename(rootfs)
    return rootfs


@pytest.fixture(scope="session")
def crun_cgroups() -> None:
    """crun refuses a hybrid cgroup host whose v2 hierarchy holds controllers ("cgroups in
    hybrid mode not supported, drop all controllers from cgroupv2"). This host binds hugetlb to
    v2 while every other controller is v1: give hugetlb a v1 hierarchy (the move is allowed while
    no v2 cgroup uses it). Pure v1 or pure v2 hosts need nothing."""
    unified = Path("/sys/fs/cgroup/unified/cgroup.controllers")
    if not unified.exists() or not Path("/sys/fs/cgroup/memory").is_dir():
        return
    for controller in unified.read_text().split():
        target = Path("/sys/fs/cgroup") / controller
        target.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "cgroup", "-o", controller, "cgroup", str(target)],
                       check=True)
    leftover = unified.read_text().split()
    if leftover:
        pytest.fail(f"cgroup v2 still holds {leftover}: crun cannot run on this hybrid host")


class Bundle:
    """A bundle dir (config.json + empty rootfs/) and the overlay mount containerd would send."""

    def __init__(self, path: Path, cid: str, lower: Path):
        self.path = path
        self.id = cid
        (path / "rootfs").mkdir(parents=True)
        (path / "upper").mkdir()
        (path / "work").mkdir()
        self.rootfs = [mount_pb2.Mount(type="overlay", source="overlay", options=[
            f"lowerdir={lower}", f"upperdir={path / 'upper'}", f"workdir={path / 'work'}"])]

    def file(self, name: str) -> Path:
        return self.path / name


def oci_spec(args: list[str], cid: str, terminal: bool = False, resources: dict | None = None,
             pid_namespace: bool = True) -> dict:
    caps = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
            "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_MKNOD",
            "CAP_AUDIT_WRITE", "CAP_SETFCAP"]
    namespaces = [{"type": t} for t in ("ipc", "uts", "mount", "network")]
    if pid_namespace:
        namespaces.append({"type": "pid"})
    linux = {"namespaces": namespaces, "cgroupsPath": f"/vmm-task-test/{cid}",
             "maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"]}
    if resources:
        linux["resources"] = resources
    return {
        "ociVersion": "1.3.0",  # as containerd 2.3-2.4 write it (scripts/demo.py's OCI_VERSION)
        "process": {
            "terminal": terminal, "user": {"uid": 0, "gid": 0}, "args": args, "cwd": "/",
            "env": ["PATH=/bin", "TERM=xterm", "HOME=/root"],
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": cid[:63],
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": linux,
    }


class Bundles:
    def __init__(self, root: Path, lower: Path):
        self._root = root
        self._lower = lower
        self.made: list[Bundle] = []

    def make(self, args: list[str], terminal: bool = False, resources: dict | None = None,
             pid_namespace: bool = True) -> Bundle:
        cid = f"t{uuid.uuid4().hex[:12]}"
        bundle = Bundle(self._root / cid, cid, self._lower)
        spec = oci_spec(args, cid, terminal, resources, pid_namespace)
        (bundle.path / "config.json").write_text(json.dumps(spec))
        self.made.append(bundle)
        return bundle


@pytest.fixture
def bundles(tmp_path, busybox_rootfs, crun_cgroups) -> Bundles:
    """The test's bundles; a container it did not delete through the API (its processes, its
    rootfs still mounted) fails it, named."""
    made = Bundles(tmp_path / "bundles", busybox_rootfs)
    yield made
    left = Leftovers()
    for bundle in made.made:
        found = take_left_in(bundle.path, cgroup=f"{CONTAINER_CGROUP}{bundle.id}")
        left.processes.update(found.processes)
        left.mounts += found.mounts
    fail_if_left(left)


class TaskClient:
    """containerd.task.v2.Task calls with the test's defaults."""

    def __init__(self, client: ttrpc.Client):
        self.client = client

    async def call(self, method: str, request, timeout: float | None = 60.0):
        from google.protobuf import empty_pb2
        return await self.client.call(TASK, method, request, RESPONSES.get(method, empty_pb2.Empty),
                                      timeout=timeout)

    async def error(self, method: str, request) -> ttrpc.RpcError:
        """The RpcError a call must fail with."""
        try:
            response = await self.call(method, request)
        except ttrpc.RpcError as e:
            return e
        raise AssertionError(f"{method} succeeded ({response}) but was expected to fail")

    async def create(self, bundle: Bundle, **io) -> int:
        request = pb.CreateTaskRequest(id=bundle.id, bundle=str(bundle.path), rootfs=bundle.rootfs,
                                       **io)
        return (await self.call("Create", request)).pid

    async def start(self, cid: str, exec_id: str = "") -> int:
        return (await self.call("Start", pb.StartRequest(id=cid, exec_id=exec_id))).pid

    async def wait(self, cid: str, exec_id: str = "", timeout: float = 60.0) -> int:
        request = pb.WaitRequest(id=cid, exec_id=exec_id)
        return (await self.call("Wait", request, timeout=timeout)).exit_status

    async def state(self, cid: str, exec_id: str = "") -> pb.StateResponse:
        return await self.call("State", pb.StateRequest(id=cid, exec_id=exec_id))

    async def kill(self, cid: str, signal_number: int, exec_id: str = "", all: bool = False):
        await self.call("Kill", pb.KillRequest(id=cid, exec_id=exec_id, signal=signal_number,
                                               all=all))

    async def delete(self, cid: str, exec_id: str = "") -> pb.DeleteResponse:
        return await self.call("Delete", pb.DeleteRequest(id=cid, exec_id=exec_id))

    async def exec(self, cid: str, exec_id: str, args: list[str], terminal: bool = False, **io):
        process = {"args": args, "cwd": "/", "env": ["PATH=/bin"], "terminal": terminal,
                   "user": {"uid": 0, "gid": 0}}
        request = pb.ExecProcessRequest(id=cid, exec_id=exec_id, terminal=terminal, **io)
        request.spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Process"
        request.spec.value = json.dumps(process).encode()
        await self.call("Exec", request)

    async def run_to_exit(self, bundle: Bundle, **io) -> int:
        """Create, start and wait; the container stays (Delete is the caller's)."""
        await self.create(bundle, **io)
        await self.start(bundle.id)
        return await self.wait(bundle.id)

    async def remove(self, cid: str) -> None:
        """Kill (if needed), wait and delete: teardown for a test's containers."""
        try:
            await self.kill(cid, signal.SIGKILL, all=True)
        except ttrpc.RpcError:
            pass
        await self.wait(cid)
        await self.delete(cid)

    async def events(self) -> list[tuple[str, object]]:
        """Every event queued in the agent, drained with SandboxService.GetEvents."""
        from google.protobuf import empty_pb2
        found = []
        while True:
            try:
                envelope = await self.client.call("grpc.SandboxService", "GetEvents",
                                                  empty_pb2.Empty(), envelope_pb.Envelope,
                                                  timeout=0.5)
            except ttrpc.RpcError as e:
                if e.code == ttrpc.Code.DEADLINE_EXCEEDED:
                    return found
                raise
            found.append((envelope.topic, _decode_event(envelope.event)))


def _decode_event(packed):
    """The event message in an Envelope's Any (type URL with or without a prefix, as
    containerd's typeurl writes the bare full name)."""
    name = packed.type_url.rsplit("/", 1)[-1]
    message_type = events_pb.DESCRIPTOR.message_types_by_name.get(name.rsplit(".", 1)[-1])
    if message_type is None or message_type.full_name != name:
        raise AssertionError(f"unexpected event type {packed.type_url!r}")
    message = getattr(events_pb, message_type.name)()
    message.ParseFromString(packed.value)
    return message


class Agent:
    """The dev-mode agent process: the venv's `vmm-task` console script."""

    def __init__(self, workdir: Path, runtime: str, *flags: str, wrapper: tuple = ()):
        """`flags`: more vmm-task options (a flag given again wins); `wrapper`: a command it runs
        under (`unshare --net`)."""
        self.runtime = runtime
        self.exit_code: int | None = None
        self.socket = workdir / "agent.sock"
        self.port_forward_socket = workdir / "port-forward.sock"
        self.run_dir = workdir / "run"
        self.log = workdir / "agent.log"
        self._log_file = open(self.log, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [*wrapper, str(Path(sys.executable).with_name("vmm-task")), "--listen", f"unix://{self.socket}",
             "--port-forward", f"unix://{self.port_forward_socket}",
             "--run-dir", str(self.run_dir), "--runtime", runtime,
             "--pod-pause", pod_pause_path(), *flags],
            stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + AGENT_START_TIMEOUT
        while b"vmm-task ready" not in self.log.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        self.pid = int(self.log.read_bytes().split(b" pid=")[1].split()[0])  # not the wrapper's

    def run(self, body, timeout: float = 120.0):
        """Run `await body(TaskClient)` on a fresh loop with a fresh connection."""
        async def main():
            client = await ttrpc.Client.connect_unix(str(self.socket))
            try:
                return await asyncio.wait_for(body(TaskClient(client)), timeout)
            finally:
                await client.close()
        return asyncio.run(main())

    def call(self, service: str, method: str, request, response_type, timeout: float = 10.0):
        """One call of any service, on a fresh connection."""
        async def main():
            client = await ttrpc.Client.connect_unix(str(self.socket))
            try:
                return await client.call(service, method, request, response_type, timeout=timeout)
            finally:
                await client.close()
        return asyncio.run(main())

    def error(self, *args, **kwargs) -> ttrpc.RpcError:
        """The error a `call` with these arguments must end in."""
        with pytest.raises(ttrpc.RpcError) as caught:
            self.call(*args, **kwargs)
        return caught.value

    def alive(self) -> bool:
        return self.process.poll() is None

    def children(self) -> list[int]:
        """Pids whose parent is the agent (containers, runtimes, zombies)."""
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_bytes()
                except OSError:
                    continue
                if int(stat[stat.rfind(b")") + 2:].split()[1]) == self.pid:
                    found.append(int(entry))
        return found

    def stop(self) -> Leftovers:
        """SIGTERM, as the VM's poweroff would (`exit_code` then says how it ended); what the
        agent did not undo (its pod namespace binds, containers still in the runtime's state) is
        taken away and returned. Mounts left by an agent killed by a signal ran no cleanups:
        not counted."""
        left = Leftovers()
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                left.other.append(f"the agent {self.pid} ignored SIGTERM for 10 s (SIGKILLed)")
        self._log_file.close()
        self.exit_code = self.process.returncode
        if self.exit_code >= 0:
            left.mounts = mountpoints_under(self.run_dir)
        unmount_all_under(self.run_dir)
        root = self.run_dir / "oci"  # the runtime's state lives in our run dir
        if root.is_dir():
            for cid in os.listdir(root):
                if (root / cid).is_dir():
                    left.other.append(f"container {cid} still in {RUNTIME_NAME}'s state (deleted with --force)")
                    left.other += [f"  agent log: {line}" for line in self._log_lines_about(cid)]
                    subprocess.run([self.runtime, "--root", str(root), "delete", "--force", cid],
                                   capture_output=True)
        return left

    def _log_lines_about(self, cid: str, most: int = 10) -> list[str]:
        """The agent's last warnings and errors naming `cid`: why its Delete left it (the agent
        releases a container whose runtime delete failed, logging the runtime's error)."""
        lines = [line for line in self.log.read_text(errors="replace").splitlines()
                 if cid in line and ("WARNING" in line or "ERROR" in line)]
        return lines[-most:]


def pod_pause_path() -> str:
    """The guest's pod-pause built for this host (rootfs-builder/pod-pause.c, cached)."""
    return str(pod_pause.build(_cache_dir()))


@pytest.fixture(scope="session")
def runtime() -> str:
    """Path of the guest's runtime made runnable here (built once into the cache)."""
    return str(guest_runtime.host_copy(RUNTIME_NAME, _cache_dir()))


@pytest.fixture(scope="module")
def agent(tmp_path_factory, busybox_rootfs, crun_cgroups, runtime) -> Agent:
    running = Agent(tmp_path_factory.mktemp("agent"), runtime)
    yield running
    try:
        assert running.alive(), f"the agent died:\n{running.log.read_text()[-3000:]}"
    finally:
        fail_if_left(running.stop(), "the module's tests and agent")
