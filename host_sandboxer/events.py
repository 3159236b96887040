"""Task events published to containerd (containerd.services.events.v1.Events/Publish).

Shims publish TaskCreate/TaskStart/TaskExit/... so containerd's event subscribers (CRI,
`ctr events`) see them. Events come from the guest (GetEvents) or from the host itself when a
VM dies. They go through one bounded queue and one sender task: a slow or absent containerd
never blocks a pod, and an event that cannot be delivered after a few tries is logged and
dropped. A guest event delivered twice (GetEvents is at-least-once) is published once.
"""

import asyncio
import collections
import hashlib
import logging
import os

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from vmm_common.protos.containerd.events import task_pb2
from vmm_common.protos.containerd.services.events.v1 import events_pb2, events_pb2_grpc

log = logging.getLogger(__name__)

NAMESPACE_KEY = "containerd-namespace"
DEFAULT_NAMESPACE = "default"


def namespace_of(context) -> str:
    """The containerd namespace a gRPC request carries in its metadata."""
    for key, value in context.invocation_metadata() or ():
        if key == NAMESPACE_KEY and value:
            return value
    return DEFAULT_NAMESPACE


def pack(message):
    """A message as containerd's typeurl packs events: an Any typed by the bare full name."""
    return any_pb2.Any(type_url=message.DESCRIPTOR.full_name, value=message.SerializeToString())


_TASK_TOPICS = {
    "/tasks/create": task_pb2.TaskCreate, "/tasks/start": task_pb2.TaskStart,
    "/tasks/delete": task_pb2.TaskDelete, "/tasks/exit": task_pb2.TaskExit,
    "/tasks/oom": task_pb2.TaskOOM, "/tasks/exec-added": task_pb2.TaskExecAdded,
    "/tasks/exec-started": task_pb2.TaskExecStarted, "/tasks/paused": task_pb2.TaskPaused,
    "/tasks/resumed": task_pb2.TaskResumed, "/tasks/checkpointed": task_pb2.TaskCheckpointed,
}


def check_guest_event(topic: str, event, container_ids) -> str:
    """Why an event from a guest must not reach containerd ("" if it may).

    The guest is untrusted: it may only speak of its own pod's containers, with a task topic
    and the message type containerd publishes under that topic."""
    message_type = _TASK_TOPICS.get(topic)
    if message_type is None:
        return f"topic {topic!r} is not a task event"
    if event.type_url != message_type.DESCRIPTOR.full_name:
        return f"topic {topic} carries {event.type_url!r}, not {message_type.DESCRIPTOR.full_name}"
    try:
        message = message_type.FromString(event.value)
    except DecodeError as exc:
        return f"undecodable {topic} event: {exc}"
    if message.container_id not in container_ids:
        return f"{topic} for container {message.container_id!r}, which is not in this pod"
    return ""


class RecentEvents:
    """The identities of the last `size` events one pod's guest delivered, to drop a repeat.

    GetEvents is at-least-once: an event whose answer the agent thinks was not delivered goes
    back to the head of its queue, so after a broken link the host may get it again, soon after
    the first time. An event's identity is its topic, the time the guest queued it (ns, stamped
    once) and its payload (container, exec id, pid, status...): two real events never share all
    three, a repeat always does. Only digests are kept (a guest's payloads may be large)."""

    def __init__(self, size: int = 256):
        self._size = size
        self._order: collections.deque[tuple] = collections.deque()
        self._seen: set[tuple] = set()

    def first_time(self, envelope) -> bool:
        """Whether `envelope` (a containerd.services.ttrpc.events.v1.Envelope) is new; it is
        remembered either way."""
        digest = hashlib.sha256(envelope.event.type_url.encode() + b"\0" + envelope.event.value).digest()
        key = (envelope.topic, envelope.timestamp.seconds, envelope.timestamp.nanos, digest)
        if key in self._seen:
            return False
        self._seen.add(key)
        self._order.append(key)
        if len(self._order) > self._size:
            self._seen.discard(self._order.popleft())
        return True


class EventPublisher:
    """Publishes to containerd at `address` (a unix socket path); no address: log only."""

    ATTEMPTS = 3

    def __init__(self, address: str | None, max_queued: int = 1024):
        self.address = address
        self._queue: asyncio.Queue = asyncio.Queue(max_queued)
        self._task: asyncio.Task | None = None
        self._channel = None
        self.published = 0
        self.dropped = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-publisher")

    def publish(self, namespace: str, topic: str, event_any) -> None:
        """Queue an event (never blocks); the oldest is dropped when the queue is full."""
        if self._queue.full():
            old_namespace, old_topic, old_event = self._queue.get_nowait()
            self.dropped += 1
            log.warning("event queue full: dropped the oldest event, %s (ns %s, %s)",
                        old_topic, old_namespace, old_event.type_url)
        self._queue.put_nowait((namespace, topic, event_any))

    async def _run(self) -> None:
        stub = None
        if self.address:
            self._channel = grpc.aio.insecure_channel(f"unix://{self.address}")
            stub = events_pb2_grpc.EventsStub(self._channel)
        while True:
            namespace, topic, event = await self._queue.get()
            if stub is None:
                log.debug("event %s (ns %s) not published: no containerd address", topic, namespace)
                continue
            await self._send(stub, namespace, topic, event)

    async def _send(self, stub, namespace: str, topic: str, event) -> None:
        if not os.path.exists(self.address):
            self.dropped += 1
            log.debug("event %s (ns %s) dropped: no containerd at %s", topic, namespace, self.address)
            return
        request = events_pb2.PublishRequest(topic=topic, event=event)
        for attempt in range(1, self.ATTEMPTS + 1):
            try:
                await stub.Publish(request, metadata=((NAMESPACE_KEY, namespace),), timeout=5)
                self.published += 1
                return
            except grpc.aio.AioRpcError as exc:
                if attempt == self.ATTEMPTS:
                    self.dropped += 1
                    log.warning("event %s (ns %s) dropped after %d attempts: %s",
                                topic, namespace, attempt, exc.details() or exc.code().name)
                    return
                await asyncio.sleep(0.2 * attempt)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()
