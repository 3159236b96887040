"""Event publishing to containerd's Events service.

A gRPC server from the generated stubs stands in for containerd's Events service (so what is
published can be inspected and containerd's failures staged); the publisher, the channel and
the wire format are the real ones. The real containerd 2.4 receives them in tests/e2e
(../shared/containerd/bin).
"""

import asyncio
import contextlib

import grpc
import pytest

from host_sandboxer.events import EventPublisher, RecentEvents, pack
from vmm_common.protos.containerd.events import task_pb2
from vmm_common.protos.containerd.services.events.v1 import events_pb2_grpc
from vmm_common.protos.containerd.services.ttrpc.events.v1 import events_pb2 as guest_events
from google.protobuf import empty_pb2


class RecordingEvents(events_pb2_grpc.EventsServicer):
    def __init__(self):
        self.received = asyncio.Queue()

    async def Publish(self, request, context):
        ns = dict(context.invocation_metadata()).get("containerd-namespace")
        await self.received.put((ns, request.topic, request.event))
        return empty_pb2.Empty()


class SlowEvents(RecordingEvents):
    """A containerd that takes 20 ms per Publish."""

    async def Publish(self, request, context):
        await asyncio.sleep(0.02)
        return await super().Publish(request, context)


@contextlib.asynccontextmanager
async def publishing_to(events: RecordingEvents, tmp_path):
    """`events` served as containerd's Events service on a unix socket, and a started
    EventPublisher to it: yields (events, publisher); both closed after."""
    server = grpc.aio.server()
    events_pb2_grpc.add_EventsServicer_to_server(events, server)
    sock = str(tmp_path / "containerd.sock")
    server.add_insecure_port(f"unix://{sock}")
    await server.start()
    publisher = EventPublisher(sock)
    publisher.start()
    try:
        yield events, publisher
    finally:
        await publisher.close()
        await server.stop(None)


@pytest.mark.timeout(20)
def test_published_events_reach_containerd_with_namespace(tmp_path):
    async def scenario():
        async with publishing_to(RecordingEvents(), tmp_path) as (events, publisher):
            exit_event = task_pb2.TaskExit(container_id="c1", id="c1", pid=7, exit_status=3)
            publisher.publish("k8s.io", "/tasks/exit", pack(exit_event), source="pod1")
            ns, topic, event = await asyncio.wait_for(events.received.get(), 10)
        assert (ns, topic, event.type_url) == ("k8s.io", "/tasks/exit", "containerd.events.TaskExit")
        assert task_pb2.TaskExit.FromString(event.value) == exit_event

    asyncio.run(scenario())


@pytest.mark.timeout(20)
def test_unreachable_containerd_drops_after_retries_without_blocking(tmp_path):
    async def scenario():
        (tmp_path / "nobody.sock").touch()  # exists, but nothing listens
        publisher = EventPublisher(str(tmp_path / "nobody.sock"))
        publisher.start()
        publisher.publish("default", "/tasks/start", pack(task_pb2.TaskStart(container_id="c")),
                          source="pod1")
        for _ in range(200):
            if publisher.dropped:
                break
            await asyncio.sleep(0.05)
        assert publisher.dropped == 1 and publisher.published == 0
        await publisher.close()

    asyncio.run(scenario())


def test_a_full_pod_queue_drops_that_pods_oldest_event_but_not_an_exit(caplog):
    async def scenario():
        publisher = EventPublisher(None, max_queued=2)  # not started: nothing drains the queue
        publisher.publish("k8s.io", "/tasks/exit", pack(task_pb2.TaskExit(container_id="a")), "pod1")
        publisher.publish("k8s.io", "/tasks/start", pack(task_pb2.TaskStart(container_id="a")), "pod1")
        publisher.publish("k8s.io", "/tasks/oom", pack(task_pb2.TaskOOM(container_id="a")), "pod1")
        publisher.publish("k8s.io", "/tasks/start", pack(task_pb2.TaskStart(container_id="b")), "pod2")
        return publisher.dropped, [(await publisher._next())[1] for _ in range(3)]

    with caplog.at_level("WARNING"):
        dropped, order = asyncio.run(scenario())
    assert dropped == 1
    assert "pod pod1: event queue full (2): dropped /tasks/start (ns k8s.io, containerd.events.TaskStart)" \
        in caplog.text
    assert order == ["/tasks/exit", "/tasks/start", "/tasks/oom"]  # pod1, pod2, pod1: in turn


@pytest.mark.timeout(30)
def test_a_flooding_pod_cannot_crowd_out_another_pods_exits(tmp_path):
    """While containerd is slow, pod1 queues 5000 events between two TaskExits of pod2: both
    exits are published within the first few events, and only pod1's events are dropped."""
    async def scenario():
        async with publishing_to(SlowEvents(), tmp_path) as (events, publisher):
            def victim_exit(name):
                publisher.publish("k8s.io", "/tasks/exit", pack(task_pb2.TaskExit(container_id=name)), "pod2")
            victim_exit("before")
            for i in range(5000):
                publisher.publish("k8s.io", "/tasks/oom", pack(task_pb2.TaskOOM(container_id=f"c{i}")), "pod1")
            victim_exit("after")
            seen = []
            while sum(topic == "/tasks/exit" for _, topic, _ in seen) < 2:
                seen.append(await asyncio.wait_for(events.received.get(), 10))
            return seen, publisher.dropped

    seen, dropped = asyncio.run(scenario())
    assert len(seen) <= 4, [topic for _, topic, _ in seen]
    exits = [task_pb2.TaskExit.FromString(e.value).container_id for _, t, e in seen if t == "/tasks/exit"]
    assert exits == ["before", "after"]
    assert dropped == 5000 - 256  # pod1's own queue (256) overflowed, nothing else


def _envelope(topic: str, message, queued_ns: int):
    envelope = guest_events.Envelope(topic=topic, event=pack(message))
    envelope.timestamp.FromNanoseconds(queued_ns)
    return envelope


def test_a_guest_event_delivered_twice_is_published_once():
    recent = RecentEvents(size=3)
    exit_c1 = _envelope("/tasks/exit", task_pb2.TaskExit(container_id="c1", id="c1", pid=7, exit_status=3), 1000)
    assert recent.first_time(exit_c1)
    assert not recent.first_time(guest_events.Envelope.FromString(exit_c1.SerializeToString()))  # the repeat
    # Not repeats: the same payload queued at another time (a second OOM), the same time with
    # another payload or topic.
    oom = task_pb2.TaskOOM(container_id="c1")
    assert recent.first_time(_envelope("/tasks/oom", oom, 2000))
    assert recent.first_time(_envelope("/tasks/oom", oom, 2001))
    assert recent.first_time(_envelope("/tasks/exit", task_pb2.TaskExit(container_id="c2", id="c2"), 1000))
    # The window is bounded: the oldest identity is forgotten.
    assert recent.first_time(exit_c1)
