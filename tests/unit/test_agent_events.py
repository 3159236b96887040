"""EventQueue (published by the Task service, drained by GetEvents) and the Envelope the
SandboxService makes of each event."""

import asyncio

from vmm_common.protos.containerd.events import task_pb2 as events_pb
from vmm_task.context import AgentContext
from vmm_task.events import EventQueue
from vmm_task.reaper import Reaper
from vmm_task.services.sandbox import SandboxService


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
        return await service.get_events(None, None)

    envelope = asyncio.run(main())
    assert envelope.topic == "/tasks/oom"
    assert envelope.event.type_url == "containerd.events.TaskOOM"  # typeurl: bare full name
    oom = events_pb.TaskOOM()
    oom.ParseFromString(envelope.event.value)
    assert oom.container_id == "c1"
    assert envelope.timestamp.seconds > 1_600_000_000
