"""What the agent reads and changes through the container's cgroup: Pids (children and execs),
Pause/Resume (processes really frozen), Stats (containerd's cgroups metrics in an Any), Update
(resources applied), OOM kills reported as TaskOOM. On this host crun uses cgroup v1; the
guest runs the v2 code paths (tests/vm)."""
import asyncio
import json
import signal

from vmm_common.protos.containerd.runc.v1 import oci_pb2
from vmm_common.protos.containerd.task.v2 import shim_pb2 as pb
from vmm_common.protos.containerd.types.task import task_pb2 as types
from vmm_common.protos.io.containerd.cgroups.v1 import metrics_pb2 as v1
from vmm_common.protos.io.containerd.cgroups.v2 import metrics_pb2 as v2

MB = 1 << 20


async def _until(predicate, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def _metrics(t, cid):
    stats = (await t.call("Stats", pb.StatsRequest(id=cid))).stats
    for kind in (v1.Metrics, v2.Metrics):
        if stats.Is(kind.DESCRIPTOR):
            metrics = kind()
            stats.Unpack(metrics)
            return metrics
    raise AssertionError(f"Stats packed {stats.type_url}, not a cgroups Metrics")


def test_pids_lists_children_and_execs(agent, bundles):
    bundle = bundles.make(["sh", "-c", "sleep 1000 & sleep 1000 & echo ready; wait"])

    async def body(t):
        await t.create(bundle, stdout=str(bundle.file("out")))
        init = await t.start(bundle.id)
        await _until(lambda: "ready" in bundle.file("out").read_text())
        await t.exec(bundle.id, "watcher", ["sleep", "1000"])
        exec_pid = await t.start(bundle.id, "watcher")
        processes = (await t.call("Pids", pb.PidsRequest(id=bundle.id))).processes
        by_pid = {}
        for p in processes:
            details = oci_pb2.ProcessDetails()
            by_pid[p.pid] = details.exec_id if p.info.Unpack(details) else ""
        await t.remove(bundle.id)
        return init, exec_pid, by_pid

    init, exec_pid, by_pid = agent.run(body)
    assert len(by_pid) == 4 and init in by_pid
    assert by_pid[exec_pid] == "watcher"


def test_pause_freezes_and_resume_thaws(agent, bundles):
    script = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; usleep 20000; done"
    bundle = bundles.make(["sh", "-c", script])
    counter = bundle.file("upper") / "tmp" / "count"  # the overlay's upper dir: seen live

    def count() -> int:
        try:
            return int(counter.read_text() or 0)
        except (OSError, ValueError):
            return 0

    async def body(t):
        await t.create(bundle)
        await t.start(bundle.id)
        await _until(lambda: count() > 2)
        await t.call("Pause", pb.PauseRequest(id=bundle.id))
        assert (await t.state(bundle.id)).status == types.PAUSED
        frozen = count()
        await asyncio.sleep(0.5)
        assert count() == frozen, "a paused container kept running"
        error = await t.error("Pause", pb.PauseRequest(id=bundle.id))
        assert error.code.name == "FAILED_PRECONDITION" and "paused" in error.message
        await t.call("Resume", pb.ResumeRequest(id=bundle.id))
        assert (await t.state(bundle.id)).status == types.RUNNING
        await _until(lambda: count() > frozen + 2)
        await t.remove(bundle.id)
        topics = [topic for topic, _ in await t.events()]
        assert "/tasks/paused" in topics and "/tasks/resumed" in topics

    agent.run(body)


def test_stats_and_update(agent, bundles):
    # a shell that built an 8 MB string (the peak shows it), then idles with a child; "ready"
    # once the child is forked, so the pids counter holds both when the test reads it
    script = "x=$(head -c 8000000 /dev/zero | tr '\\0' a); sleep 1000 & echo ready; wait"
    bundle = bundles.make(["sh", "-c", script],
                          resources={"memory": {"limit": 256 * MB}, "pids": {"limit": 50}})

    async def body(t):
        await t.create(bundle, stdout=str(bundle.file("out")))
        await t.start(bundle.id)
        await _until(lambda: "ready" in bundle.file("out").read_text())
        before = await _metrics(t, bundle.id)
        resources = {"memory": {"limit": 128 * MB}, "pids": {"limit": 40}}
        request = pb.UpdateTaskRequest(id=bundle.id)
        request.resources.type_url = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
        request.resources.value = json.dumps(resources).encode()
        await t.call("Update", request)
        after = await _metrics(t, bundle.id)
        await t.remove(bundle.id)
        return before, after

    before, after = agent.run(body)
    if isinstance(before, v1.Metrics):
        assert before.memory.usage.limit == 256 * MB and after.memory.usage.limit == 128 * MB
        assert before.memory.usage.max > 8_000_000
        assert before.cpu.usage.total > 0
    else:
        assert before.memory.usage_limit == 256 * MB and after.memory.usage_limit == 128 * MB
        assert before.memory.max_usage > 8_000_000
        assert before.cpu.usage_usec > 0
    assert before.pids.current >= 2 and (before.pids.limit, after.pids.limit) == (50, 40)


def test_oom_kill_is_reported(agent, bundles):
    bundle = bundles.make(["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
                          resources={"memory": {"limit": 16 * MB}})

    async def body(t):
        await t.events()  # drop earlier tests' events
        status = await t.run_to_exit(bundle)
        await t.delete(bundle.id)
        return status, await t.events()

    status, events = agent.run(body)
    assert status == 128 + signal.SIGKILL
    ooms = [e for topic, e in events if topic == "/tasks/oom"]
    assert ooms and ooms[0].container_id == bundle.id
    # the kill is reported before the exit it caused (the kubelet then sees OOMKilled)
    topics = [topic for topic, e in events if topic in ("/tasks/oom", "/tasks/exit")]
    assert topics.index("/tasks/oom") < topics.index("/tasks/exit"), topics
