"""EventQueue (published by the Task service, drained by GetEvents), the Envelope the
SandboxService makes of each event, and that an event whose answer never reaches the host is
queued again."""

import asyncio

from google.protobuf import empty_pb2

from vmm_common import ttrpc
from vmm_common.protos.containerd.events import task_pb2 as events_pb
from vmm_common.protos.ttrpc.request_pb2 import Request
from vmm_common.ttrpc import CallContext
from vmm_common.ttrpc import frame as fr
from vmm_common.ttrpc.connection import ServerConnection
from vmm_task.context import AgentContext
from vmm_task.events import EventQueue
from vmm_task.reaper import Reaper
from vmm_task.services.sandbox import SandboxService
from vmm_task.services.sandbox import register as register_sandbox


def test_events_come_out_in_order_and_next_waits_for_one():
    async def main():
        queue = EventQueue()
        waiting = asyncio.ensure_future(queue.next())
        await asyncio.sleep(0.05)
        assert not waiting.done()
        queue.publish("/tasks/start", events_pb.TaskStart(container_id="a", pid=1))
        queue.publish("/tasks/exit", events_pb.TaskExit(container_id="a", exit_status=3))
        first = await asyncio.wait_for(waiting, 1)
        second = await queue.next()
        return first, second, len(queue)

    first, second, left = asyncio.run(main())
    assert (first.topic, second.topic) == ("/tasks/start", "/tasks/exit")
    assert second.message.exit_status == 3 and left == 0


def test_full_queue_drops_the_oldest():
    async def main():
        queue = EventQueue(max_events=3)
        for i in range(5):
            queue.publish("/tasks/start", events_pb.TaskStart(container_id=str(i)))
        drained = [(await queue.next()).message.container_id for _ in range(3)]
        return drained, queue.dropped_total, queue.published_total

    assert asyncio.run(main()) == (["2", "3", "4"], 2, 5)


def test_get_events_wraps_each_event_as_containerd_does():
    async def main():
        ctx = AgentContext(reaper=Reaper(), events=EventQueue(), dev_mode=True)
        service = SandboxService(ctx)
        ctx.events.publish("/tasks/oom", events_pb.TaskOOM(container_id="c1"))
        return await service.get_events(None, CallContext("grpc.SandboxService", "GetEvents"))

    envelope = asyncio.run(main())
    assert envelope.topic == "/tasks/oom"
    assert envelope.event.type_url == "containerd.events.TaskOOM"  # typeurl: bare full name
    oom = events_pb.TaskOOM()
    oom.ParseFromString(envelope.event.value)
    assert oom.container_id == "c1"
    assert envelope.timestamp.seconds > 1_600_000_000


def test_put_back_returns_an_event_to_its_place_before_later_ones():
    async def main():
        queue = EventQueue()
        for cid in "abc":
            queue.publish("/tasks/start", events_pb.TaskStart(container_id=cid))
        a, b = await queue.next(), await queue.next()
        queue.put_back(b)  # given back out of order: b's answer failed first
        queue.put_back(a)
        return [(await queue.next()).message.container_id for _ in range(3)]

    assert asyncio.run(main()) == ["a", "b", "c"]


class _ChannelThatCannotAnswer:
    """A ttrpc channel whose peer vanished after sending its request: every write fails.

    Stands in for a host connection that breaks between the agent taking an event and
    answering (a real socket cannot be made to fail at exactly that point)."""

    def __init__(self, *frames):
        self.incoming: asyncio.Queue = asyncio.Queue()
        for frame in frames:
            self.incoming.put_nowait(frame)

    async def recv(self):
        return await self.incoming.get()

    async def send(self, *_frame):
        raise BrokenPipeError("host gone")

    async def close(self):
        pass


def _get_events_request(stream_id: int, timeout_s: float = 0) -> fr.Frame:
    request = Request(service="grpc.SandboxService", method="GetEvents",
                      payload=empty_pb2.Empty().SerializeToString(),
                      timeout_nano=int(timeout_s * 1e9))
    return fr.Frame(stream_id, fr.REQUEST, 0, request.SerializeToString())


async def _serving_get_events(channel):
    """The agent's SandboxService on one ttrpc connection over `channel`, and its queue."""
    ctx = AgentContext(reaper=Reaper(), events=EventQueue(), dev_mode=True)
    server = ttrpc.Server()
    register_sandbox(server, ctx)
    connection = ServerConnection(server.lookup, channel, "test-host")
    return ctx.events, asyncio.create_task(connection.run())


async def _until_waiting(queue: EventQueue):
    while not queue._ready._waiters:  # the handler is parked in next()
        await asyncio.sleep(0)


def test_event_taken_by_a_call_whose_answer_fails_is_queued_again_in_order():
    async def main():
        channel = _ChannelThatCannotAnswer(_get_events_request(1))
        queue, connection = await _serving_get_events(channel)
        await _until_waiting(queue)
        queue.publish("/tasks/start", events_pb.TaskStart(container_id="first"))
        queue.publish("/tasks/start", events_pb.TaskStart(container_id="second"))
        while len(queue) != 2:  # GetEvents took "first", then failed to answer
            await asyncio.sleep(0.01)
        channel.incoming.put_nowait(None)
        await connection
        return [(await queue.next()).message.container_id for _ in range(2)]

    assert asyncio.run(asyncio.wait_for(main(), 5)) == ["first", "second"]


def test_call_cancelled_as_its_event_arrives_leaves_the_event_queued():
    """The reported race: the deadline cancels GetEvents in the same loop step that wakes it."""
    async def main():
        channel = _ChannelThatCannotAnswer(_get_events_request(1, timeout_s=60))
        queue, connection = await _serving_get_events(channel)
        await _until_waiting(queue)
        call, = [t for t in asyncio.all_tasks() if t.get_name().endswith("/GetEvents")]
        queue.publish("/tasks/exit", events_pb.TaskExit(container_id="c", exit_status=7))
        call.cancel()  # as the deadline's timer would, before the woken handler runs
        await asyncio.gather(call, return_exceptions=True)
        channel.incoming.put_nowait(None)
        await connection
        return len(queue), (await queue.next()).message.exit_status

    assert asyncio.run(asyncio.wait_for(main(), 5)) == (1, 7)
