"""Task events published to containerd (containerd.services.events.v1.Events/Publish).

Shims publish TaskCreate/TaskStart/TaskExit/... so containerd's event subscribers (CRI,
`ctr events`) see them. Events come from the guest (GetEvents) or from the host itself when a
VM dies. They go through a bounded queue per pod, served in turn by one sender task: a slow or
absent containerd never blocks a pod, a pod never crowds out another, and an event that cannot
be delivered after a few tries is logged and dropped. What a guest sends is checked, bounded and
rebuilt before it gets here (sandbox/guest_events.py); one delivered twice (GetEvents is
at-least-once) is published once.
"""

import asyncio
import collections
import hashlib
import logging
import os

import grpc
from google.protobuf import any_pb2

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
    """Publishes to containerd at `address` (a unix socket path); no address: log only.

    Each source (a pod) has its own bounded queue and the sender takes from the sources in
    turn, so a pod with many events delays only itself and can never push another pod's
    TaskExit out. A full queue drops the source's oldest event, one that is not an exit if it
    has any (CRI needs the exits to see containers end)."""

    ATTEMPTS = 3

    def __init__(self, address: str | None, max_queued: int = 256):
        self.address = address
        self._max_queued = max_queued  # per source
        self._lanes: dict[str, collections.deque] = {}  # by source, in the order they are served
        self._queued = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._channel = None
        self.published = 0
        self.dropped = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-publisher")

    def publish(self, namespace: str, topic: str, event_any, source: str) -> None:
        """Queue an event of `source` (the pod it is about); never blocks."""
        lane = self._lanes.setdefault(source, collections.deque())
        if len(lane) >= self._max_queued:
            victim = next((e for e in lane if e[1] != "/tasks/exit"), lane[0])
            lane.remove(victim)
            self.dropped += 1
            log.warning("pod %s: event queue full (%d): dropped %s (ns %s, %s)",
                        source, self._max_queued, victim[1], victim[0], victim[2].type_url)
        lane.append((namespace, topic, event_any))
        self._queued.set()

    async def _next(self) -> tuple:
        """The oldest event of the source whose turn it is; that source's turn then passes."""
        while not self._lanes:
            self._queued.clear()
            await self._queued.wait()
        source = next(iter(self._lanes))
        lane = self._lanes.pop(source)
        event = lane.popleft()
        if lane:
            self._lanes[source] = lane  # back of the line
        return event

    async def _run(self) -> None:
        stub = None
        if self.address:
            self._channel = grpc.aio.insecure_channel(f"unix://{self.address}")
            stub = events_pb2_grpc.EventsStub(self._channel)
        while True:
            namespace, topic, event = await self._next()
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
