"""Task events waiting for the host: services `publish`, `grpc.SandboxService/GetEvents` drains.

The host pulls one event per GetEvents call, so events queue here until it asks. The queue is
bounded: if the host stops pulling, the oldest events are dropped (and counted) rather than
growing the agent's memory without limit. An event whose GetEvents answer never reached the
host (call cancelled, deadline passed, connection broken) is put back in its place at the head.
"""

import asyncio
import logging
import itertools
import time
from collections import deque, namedtuple

log = logging.getLogger(__name__)


# topic: e.g. "/tasks/exit" (containerd's runtime topics); message: a protobuf message, e.g.
# containerd.events.TaskExit; timestamp_ns: time.time_ns() at publish; seq: publish order (the wall
# clock may be stepped by SyncClock). collections' namedtuple, not typing's: the guest agent does
# not import typing before ready (~9 M instructions).
Event = namedtuple("Event", "topic message timestamp_ns seq", defaults=(0,))


class EventQueue:
    def __init__(self, max_events: int = 1024):
        self._events: deque[Event] = deque()
        self._max = max_events
        self._ready = asyncio.Event()
        self.published_total = 0
        self.dropped_total = 0
        self._seq = itertools.count()

    def publish(self, topic: str, message) -> None:
        """Queue an event; never blocks (safe from any handler on the loop thread)."""
        if len(self._events) >= self._max:
            dropped = self._events.popleft()
            self.dropped_total += 1
            log.warning("event queue full (%d): dropped oldest %s", self._max, dropped.topic)
        self._events.append(Event(topic, message, time.time_ns(), next(self._seq)))
        self.published_total += 1
        self._ready.set()

    async def next(self) -> Event:
        """The oldest queued event, waiting until there is one."""
        while not self._events:
            self._ready.clear()
            await self._ready.wait()
        return self._events.popleft()

    def put_back(self, event: Event) -> None:
        """Return a taken event that was not delivered, before every later-published one.

        Not bounded by max_events: at most one event per in-flight GetEvents comes back."""
        position = 0
        while position < len(self._events) and self._events[position].seq < event.seq:
            position += 1
        self._events.insert(position, event)
        log.info("event %s was not delivered: queued again", event.topic)
        self._ready.set()

    def __len__(self) -> int:
        return len(self._events)
