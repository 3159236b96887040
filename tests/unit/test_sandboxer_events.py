"""Event publishing to containerd's Events service.

containerd is not installed here, so a gRPC server from the generated stubs stands in for its
Events service; the publisher, the channel and the wire format are the real ones.
"""

import asyncio

import grpc
import pytest

from host_sandboxer.events import EventPublisher, RecentEvents, check_guest_event, pack
from vmm_common.protos.containerd.events import task_pb2
from vmm_common.protos.containerd.services.events.v1 import events_pb2_grpc
from vmm_common.protos.containerd.services.ttrpc.events.v1 import events_pb2 as guest_events
from google.protobuf import any_pb2, empty_pb2


class RecordingEvents(events_pb2_grpc.EventsServicer):
    def __init__(self):
        self.received = asyncio.Queue()

    async def Publish(self, request, context):
        ns = dict(context.invocation_metadata()).get("containerd-namespace")
        await self.received.put((ns, request.topic, request.event))
        return empty_pb2.Empty()


@pytest.mark.timeout(20)
def test_published_events_reach_containerd_with_namespace(tmp_path):
    async def scenario():
        server = grpc.aio.server()
        events = RecordingEvents()
        events_pb2_grpc.add_EventsServicer_to_server(events, server)
        sock = str(tmp_path / "containerd.sock")
        server.add_insecure_port(f"unix://{sock}")
        await server.start()
        publisher = EventPublisher(sock)
        publisher.start()
        exit_event = task_pb2.TaskExit(container_id="c1", id="c1", pid=7, exit_status=3)
        publisher.publish("k8s.io", "/tasks/exit", pack(exit_event))
        ns, topic, event = await asyncio.wait_for(events.received.get(), 10)
        assert (ns, topic, event.type_url) == ("k8s.io", "/tasks/exit", "containerd.events.TaskExit")
        assert task_pb2.TaskExit.FromString(event.value) == exit_event
        await publisher.close()
        await server.stop(None)

    asyncio.run(scenario())


@pytest.mark.timeout(20)
def test_unreachable_containerd_drops_after_retries_without_blocking(tmp_path):
    async def scenario():
        (tmp_path / "nobody.sock").touch()  # exists, but nothing listens
        publisher = EventPublisher(str(tmp_path / "nobody.sock"))
        publisher.start()
        publisher.publish("default", "/tasks/start", pack(task_pb2.TaskStart(container_id="c")))
        for _ in range(200):
            if publisher.dropped:
                break
            await asyncio.sleep(0.05)
        assert publisher.dropped == 1 and publisher.published == 0
        await publisher.close()

    asyncio.run(scenario())


def test_guest_events_only_about_its_own_containers_pass():
    mine = pack(task_pb2.TaskExit(container_id="c1", id="c1", exit_status=0))
    assert check_guest_event("/tasks/exit", mine, {"c1"}) == ""
    other = pack(task_pb2.TaskExit(container_id="victim", id="victim"))
    assert "not in this pod" in check_guest_event("/tasks/exit", other, {"c1"})
    assert "not a task event" in check_guest_event("/containers/delete", mine, {"c1"})
    assert "not containerd.events.TaskStart" in check_guest_event("/tasks/start", mine, {"c1"})
    garbage = any_pb2.Any(type_url="containerd.events.TaskExit", value=b"\xff\xff\xff")
    assert "undecodable" in check_guest_event("/tasks/exit", garbage, {"c1"})


def test_full_publisher_queue_logs_the_event_it_drops(caplog):
    async def scenario():
        publisher = EventPublisher(None, max_queued=1)  # not started: nothing drains the queue
        publisher.publish("k8s.io", "/tasks/start", pack(task_pb2.TaskStart(container_id="a")))
        publisher.publish("k8s.io", "/tasks/exit", pack(task_pb2.TaskExit(container_id="a")))
        return publisher.dropped

    with caplog.at_level("WARNING"):
        assert asyncio.run(scenario()) == 1
    assert "dropped the oldest event, /tasks/start (ns k8s.io, containerd.events.TaskStart)" \
        in caplog.text


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
