"""A pod's guest events on their way to containerd (sandbox/guest_events.py): bounded in size
and rate per pod, fair between pods, and rebuilt by the host from what it checked.

The guest is a fake event source (FakeGuest answers GetEvents from a script: no VM needed to
send what a hostile agent would); the pods are real Pod objects on a temporary state dir, and
containerd is a gRPC server from the generated stubs (as in test_sandboxer_events.py).
"""

import asyncio
import itertools
import logging

import pytest
from google.protobuf import any_pb2

from host_sandboxer.events import pack
from host_sandboxer.sandbox import guest_events
from host_sandboxer.sandbox.pod import Pod
from host_sandboxer.sandbox.podconfig import PodConfig
from host_sandboxer.sandbox.statedir import StateDir
from host_sandboxer.taskproxy.stdio import PortAllocator, ProcessStdio
from test_sandboxer_events import SlowEvents, publishing_to
from vmm_common.protos.containerd.events import task_pb2
from vmm_common.protos.containerd.services.ttrpc.events.v1 import events_pb2 as guest_pb

FIFOS = {"stdin": "/run/containerd/fifo/1/c1-stdin", "stdout": "/run/containerd/fifo/1/c1-stdout",
         "stderr": "/run/containerd/fifo/1/c1-stderr"}


class FakeGuest:
    """The pod's agent link, answering GetEvents with the envelopes `events` yields (then
    waiting for ever, as an agent with nothing queued does). Counts the calls."""

    def __init__(self, events):
        self._events = iter(events)
        self.calls = 0

    async def call(self, service, method, request, response_type, timeout=None):
        assert (service, method) == ("grpc.SandboxService", "GetEvents")
        self.calls += 1
        envelope = next(self._events, None)
        if envelope is None:
            await asyncio.Event().wait()
        await asyncio.sleep(0)  # a real call yields to the loop
        return envelope


class Published:
    """A publisher that records what the pump hands it."""

    def __init__(self):
        self.events = []

    def publish(self, namespace, topic, event, source):
        self.events.append((source, topic, event))


def unknown_field(data: bytes) -> bytes:
    """Field 999 (no TaskX message has it), length-delimited, holding `data`."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)
    return varint((999 << 3) | 2) + varint(len(data)) + data


def envelope(topic: str, message, queued_ns: int = 1) -> guest_pb.Envelope:
    env = guest_pb.Envelope(topic=topic, event=pack(message))
    env.timestamp.FromNanoseconds(queued_ns)
    return env


def make_pod(tmp_path, pod_id: str, publisher, guest_events_script) -> Pod:
    """A pod with container c1 (init, FIFOs) and exec e1, its agent a FakeGuest."""
    state = StateDir(tmp_path / "state")
    state.create_sandbox_dir(pod_id)
    pod = Pod(pod_id, state, "k8s.io", PodConfig(), any_pb2.Any(), publisher)
    marks = tmp_path / pod_id
    stdio = ProcessStdio(dict(FIFOS), {}, marks)
    pod.add_container("c1", "/run/containerd/io.containerd.runtime.v2.task/k8s.io/c1", stdio)
    pod.add_process(pod.containers["c1"], "e1", ProcessStdio.create("", "", "", PortAllocator(), marks))
    pod.agent = FakeGuest(guest_events_script)
    return pod


async def pump_until(pod, done, timeout=10.0, **budget):
    task = asyncio.create_task(guest_events.pump(pod, **budget))
    try:
        await asyncio.wait_for(done(), timeout)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_an_oversized_event_is_dropped_naming_the_pod(tmp_path, caplog):
    huge = task_pb2.TaskExit(container_id="c1", id="c1", exit_status=1)
    padded = envelope("/tasks/exit", huge, 1)
    padded.event.value += unknown_field(b"x" * (4 << 20))
    normal = envelope("/tasks/exit", task_pb2.TaskExit(container_id="c1", id="c1", exit_status=2), 2)

    async def scenario():
        published = Published()
        pod = make_pod(tmp_path, "pod-big", published, [padded, normal])
        await pump_until(pod, lambda: until(lambda: published.events))
        return published.events

    with caplog.at_level(logging.WARNING):
        events = asyncio.run(scenario())
    assert [task_pb2.TaskExit.FromString(e.value).exit_status for _, _, e in events] == [2]
    assert f"pod pod-big: guest event of {padded.ByteSize()} bytes dropped (at most 65536)" in caplog.text


async def until(condition, poll=0.005):
    while not condition():
        await asyncio.sleep(poll)


def test_a_flooding_pod_is_pulled_from_at_its_rate_while_another_pod_is_not_slowed(tmp_path, caplog):
    """pod1's guest has events without end; pod2's has 50. Over one second pod1 is pulled
    from at most burst + rate times; pod2 gets all of its events through meanwhile."""
    flood = (envelope("/tasks/oom", task_pb2.TaskOOM(container_id="c1"), n) for n in itertools.count(1))
    calm = [envelope("/tasks/oom", task_pb2.TaskOOM(container_id="c1"), n) for n in range(1, 51)]

    async def scenario():
        published = Published()
        flooding = make_pod(tmp_path, "pod1", published, flood)
        quiet = make_pod(tmp_path, "pod2", published, calm)
        pumps = [asyncio.create_task(guest_events.pump(flooding, rate=50, burst=20)),
                 asyncio.create_task(guest_events.pump(quiet, rate=50, burst=100))]
        await asyncio.sleep(1.0)
        quiet_count = sum(source == "pod2" for source, _, _ in published.events)
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        return flooding.agent.calls, quiet_count

    with caplog.at_level(logging.WARNING):
        flood_calls, quiet_count = asyncio.run(scenario())
    assert 50 <= flood_calls <= 20 + 50 * 1.0 + 5, flood_calls
    assert quiet_count == 50
    assert "pod pod1: guest sends events faster than 50/s: pulling them more slowly" in caplog.text
    assert "pod2: guest sends events faster" not in caplog.text


@pytest.mark.timeout(60)
def test_two_pods_through_one_publisher_the_floods_cost_only_the_flooding_pod(tmp_path):
    """pod1's guest floods (at the default budget) while containerd is slow; the TaskExit of
    pod2's container reaches containerd within the first few events."""
    flood = (envelope("/tasks/oom", task_pb2.TaskOOM(container_id="c1"), n) for n in itertools.count(1))
    victim = [envelope("/tasks/exit", task_pb2.TaskExit(container_id="c1", id="c1", pid=9, exit_status=0))]

    async def scenario():
        async with publishing_to(SlowEvents(), tmp_path) as (containerd, publisher):
            flooding = make_pod(tmp_path, "pod1", publisher, flood)
            pump1 = asyncio.create_task(guest_events.pump(flooding))
            await asyncio.sleep(0.5)  # pod1's flood fills the publisher first
            while not containerd.received.empty():  # count from pod2's start on
                containerd.received.get_nowait()
            quiet = make_pod(tmp_path, "pod2", publisher, victim)
            pump2 = asyncio.create_task(guest_events.pump(quiet))
            received = []
            while not any(topic == "/tasks/exit" for _, topic, _ in received):
                received.append(await asyncio.wait_for(containerd.received.get(), 10))
            for task in (pump1, pump2):
                task.cancel()
            await asyncio.gather(pump1, pump2, return_exceptions=True)
            return received

    received = asyncio.run(scenario())
    assert len(received) <= 3, [topic for _, topic, _ in received]
    assert task_pb2.TaskExit.FromString(received[-1][2].value).pid == 9


def rebuilt(tmp_path, topic, message, prepare=None, extra: bytes = b""):
    """What the host publishes for one guest event, `extra` bytes appended (None: dropped)."""
    said = envelope(topic, message)
    said.event.value += extra

    async def scenario():
        published = Published()
        pod = make_pod(tmp_path, "pod-r", published, [said])
        if prepare is not None:
            await prepare(pod)
        await pump_until(pod, lambda: until(lambda: pod.agent.calls == 2))
        return published.events

    events = asyncio.run(scenario())
    return events[0][2] if events else None


def test_a_create_event_is_rebuilt_with_the_hosts_paths_and_nothing_else(tmp_path):
    said = task_pb2.TaskCreate(container_id="c1", bundle="/run/kuasar/state/c1", pid=42,
                               io=task_pb2.TaskIO(stdout="vsock://2049?ack", terminal=True),
                               checkpoint="/etc", rootfs=[{"type": "bind", "source": "/"}])
    out = rebuilt(tmp_path, "/tasks/create", said, extra=unknown_field(b"guest says"))
    assert out.type_url == "containerd.events.TaskCreate"
    assert out.value == task_pb2.TaskCreate(  # exactly this: no rootfs, checkpoint, unknown field
        container_id="c1", bundle="/run/containerd/io.containerd.runtime.v2.task/k8s.io/c1", pid=42,
        io=task_pb2.TaskIO(terminal=True, **FIFOS)).SerializeToString()


def test_exit_and_exec_events_name_only_processes_the_host_knows(tmp_path, caplog):
    stamp = {"seconds": 1700000000, "nanos": 5}
    exit_e1 = task_pb2.TaskExit(container_id="c1", id="e1", pid=77, exit_status=3, exited_at=stamp)
    assert task_pb2.TaskExit.FromString(rebuilt(tmp_path, "/tasks/exit", exit_e1).value) == exit_e1

    async def delete_e1(pod):  # containerd deleted the exec before its exit event arrived
        await pod.remove_process(pod.containers["c1"], "e1")
    assert rebuilt(tmp_path, "/tasks/exit", exit_e1, delete_e1) is not None

    with caplog.at_level(logging.WARNING):
        for topic, message in (
                ("/tasks/exit", task_pb2.TaskExit(container_id="c1", id="ghost")),
                ("/tasks/exec-started", task_pb2.TaskExecStarted(container_id="c1", exec_id="ghost")),
                ("/tasks/exit", task_pb2.TaskExit(container_id="other-pods", id="other-pods")),
                ("/tasks/oom", task_pb2.TaskExit(container_id="c1"))):
            assert rebuilt(tmp_path, topic, message) is None
    assert "exec 'ghost' is not a process of container c1" in caplog.text
    assert "container 'other-pods', which is not in this pod" in caplog.text
    assert "topic /tasks/oom carries 'containerd.events.TaskExit', not containerd.events.TaskOOM" \
        in caplog.text


def test_a_bad_timestamp_becomes_the_hosts_time_and_a_huge_topic_is_logged_capped(tmp_path, caplog):
    import time
    out = rebuilt(tmp_path, "/tasks/delete", task_pb2.TaskDelete(
        container_id="c1", id="c1", exited_at={"seconds": -5, "nanos": 2 * 10**9}))
    assert abs(task_pb2.TaskDelete.FromString(out.value).exited_at.seconds - time.time()) < 60
    with caplog.at_level(logging.WARNING):
        assert rebuilt(tmp_path, "/" + "t" * 10000, task_pb2.TaskOOM(container_id="c1")) is None
    assert "more characters cut]" in caplog.text and len(caplog.text) < 2000
