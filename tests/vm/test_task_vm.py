"""The Task API inside the booted guest (QEMU TCG, hybrid vsock): bundles on the shared
directory, crun in the guest, cgroup v2. Output both to a file on the shared directory and over
Kuasar's `vsock://PORT` stdio (the agent listens, the host connects)."""
import asyncio
import json
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

from vmm_common.protos.containerd.task.v2 import shim_pb2 as pb
from vmm_common.protos.containerd.types.task import task_pb2 as types
from vmm_common.protos.io.containerd.cgroups.v2 import metrics_pb2 as v2

GUEST_SHARE = "/run/kuasar/state"
TASK = "containerd.task.v2.Task"
APPLETS = ("sh", "echo", "cat", "sleep", "seq", "true", "dd")
STDOUT_PORT = 40001


def make_bundle(share: Path, args: list[str], memory_limit: int = 0) -> tuple[str, Path]:
    """A bundle in the shared dir: crun's default spec running `args` over a busybox rootfs."""
    cid = f"vm{uuid.uuid4().hex[:10]}"
    bundle = share / cid
    (bundle / "rootfs" / "bin").mkdir(parents=True)
    for d in ("proc", "sys", "dev", "tmp"):
        (bundle / "rootfs" / d).mkdir()
    shutil.copy2("/bin/busybox", bundle / "rootfs" / "bin" / "busybox")
    for applet in APPLETS:
        (bundle / "rootfs" / "bin" / applet).symlink_to("busybox")
    subprocess.run(["crun", "spec", "-b", str(bundle)], check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"].update(terminal=False, args=args, env=["PATH=/bin"])
    if memory_limit:
        spec["linux"]["resources"] = {"memory": {"limit": memory_limit}}
    (bundle / "config.json").write_text(json.dumps(spec))
    return cid, bundle


async def create_task(client, cid: str, **stdio: str) -> pb.CreateTaskResponse:
    """Task.Create of the bundle `make_bundle` put in the shared directory as `cid`, with the
    given stdio strings (e.g. stdout=f"vsock://{port}")."""
    return await client.call(TASK, "Create", pb.CreateTaskRequest(id=cid, bundle=f"{GUEST_SHARE}/{cid}", **stdio),
                             pb.CreateTaskResponse, timeout=60)


def test_lifecycle_in_the_vm(vm):
    first, first_dir = make_bundle(vm.share_dir, ["sh", "-c", "echo hello from the guest; exit 3"])
    second, _ = make_bundle(vm.share_dir, ["sh", "-c", "seq 1 20000; sleep 1000"])

    async def scenario():
        client = await vm.client()

        async def call(method, request, response=None, timeout=60.0):
            from google.protobuf import empty_pb2
            return await client.call(TASK, method, request, response or empty_pb2.Empty,
                                     timeout=timeout)
        try:
            # 1: stdout to a file on the shared directory, exit code and states
            created = await call("Create", pb.CreateTaskRequest(
                id=first, bundle=f"{GUEST_SHARE}/{first}", stdout=f"{GUEST_SHARE}/{first}/out"),
                pb.CreateTaskResponse)
            await call("Start", pb.StartRequest(id=first), pb.StartResponse)
            waited = await call("Wait", pb.WaitRequest(id=first), pb.WaitResponse)
            state = await call("State", pb.StateRequest(id=first), pb.StateResponse)
            deleted = await call("Delete", pb.DeleteRequest(id=first), pb.DeleteResponse)

            # 2: stdout over vsock, exec, stats (cgroup v2), pause/resume, kill
            await create_task(client, second, stdout=f"vsock://{STDOUT_PORT}")
            reader, writer = await vm.guest.open_connection(STDOUT_PORT)
            await call("Start", pb.StartRequest(id=second), pb.StartResponse)
            expected = "".join(f"{i}\n" for i in range(1, 20001)).encode()
            streamed = await asyncio.wait_for(reader.readexactly(len(expected)), 60)
            exec_request = pb.ExecProcessRequest(
                id=second, exec_id="probe", stdout=f"{GUEST_SHARE}/{second}/exec-out")
            exec_request.spec.value = json.dumps(
                {"args": ["sh", "-c", "echo in exec; exit 5"], "cwd": "/",
                 "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}).encode()
            await call("Exec", exec_request)
            await call("Start", pb.StartRequest(id=second, exec_id="probe"), pb.StartResponse)
            exec_exit = await call("Wait", pb.WaitRequest(id=second, exec_id="probe"),
                                   pb.WaitResponse)
            stats = (await call("Stats", pb.StatsRequest(id=second), pb.StatsResponse)).stats
            await call("Pause", pb.PauseRequest(id=second))
            paused = await call("State", pb.StateRequest(id=second), pb.StateResponse)
            await call("Resume", pb.ResumeRequest(id=second))
            await call("Kill", pb.KillRequest(id=second, signal=signal.SIGKILL, all=True))
            killed = await call("Wait", pb.WaitRequest(id=second), pb.WaitResponse)
            tail = await asyncio.wait_for(reader.read(), 30)  # EOF once the container is gone
            writer.close()
            await call("Delete", pb.DeleteRequest(id=second), pb.DeleteResponse)
            return (created, waited, state, deleted, streamed, expected, exec_exit, stats, paused,
                    killed, tail)
        finally:
            await client.close()

    (created, waited, state, deleted, streamed, expected, exec_exit, stats, paused, killed,
     tail) = vm.run(scenario(), timeout=300)
    assert created.pid > 1 and waited.exit_status == 3
    assert state.status == types.STOPPED and deleted.exit_status == 3
    assert (first_dir / "out").read_text() == "hello from the guest\n"
    assert streamed == expected and tail == b""
    assert exec_exit.exit_status == 5
    assert (vm.share_dir / second / "exec-out").read_text() == "in exec\n"
    metrics = v2.Metrics()
    assert stats.Unpack(metrics), stats.type_url  # the guest runs cgroup v2
    assert metrics.pids.current >= 1 and metrics.memory.usage > 0 and metrics.cpu.usage_usec > 0
    assert paused.status == types.PAUSED
    assert killed.exit_status == 128 + signal.SIGKILL


def test_oom_kill_in_the_vm_is_a_task_oom_event(vm):
    """cgroup v2: memory.events' oom_kill, watched with inotify, becomes /tasks/oom."""
    cid, _ = make_bundle(vm.share_dir, ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
                         memory_limit=16 << 20)

    async def scenario():
        from google.protobuf import empty_pb2

        from vmm_common.protos.containerd.events import task_pb2 as events
        from vmm_common.protos.containerd.services.ttrpc.events.v1 import events_pb2

        client = await vm.client()
        try:
            await client.call(TASK, "Create", pb.CreateTaskRequest(
                id=cid, bundle=f"{GUEST_SHARE}/{cid}"), pb.CreateTaskResponse, timeout=60)
            await client.call(TASK, "Start", pb.StartRequest(id=cid), pb.StartResponse, timeout=60)
            waited = await client.call(TASK, "Wait", pb.WaitRequest(id=cid), pb.WaitResponse,
                                       timeout=120)
            ooms = []
            while True:
                envelope = await client.call("grpc.SandboxService", "GetEvents", empty_pb2.Empty(),
                                             events_pb2.Envelope, timeout=10)
                if envelope.topic == "/tasks/oom":
                    oom = events.TaskOOM()
                    oom.ParseFromString(envelope.event.value)
                    ooms.append(oom.container_id)
                if envelope.topic == "/tasks/exit":
                    break
            await client.call(TASK, "Delete", pb.DeleteRequest(id=cid), pb.DeleteResponse)
            return waited.exit_status, ooms
        finally:
            await client.close()

    status, ooms = vm.run(scenario(), timeout=300)
    assert status == 128 + signal.SIGKILL
    assert ooms == [cid]
