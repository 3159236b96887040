"""Task events waiting for the host: services `publish`, `grpc.SandboxService/GetEvents` drains.

The host pulls one event per GetEvents call, so events queue here until it asks. The queue is
bounded: if the host stops pulling, the oldest events are dropped (and counted) rather than
growing the agent's memory without limit.
"""

import asyncio
import logging
import time
from collections import deque
from typing import NamedTuple

log = logging.getLogger(__name__)


class Event(NamedTuple):
    topic: str          # e.g. "/tasks/exit" (containerd's runtime topics)
    message: object     # a protobuf message, e.g. containerd.events.TaskExit
    timestamp_ns: int   # time.time_ns() at publish


class EventQueue:
    def __init__(self, max_events: int = 1024):
        self._events: deque[Event] = deque()
        self._max = max_events
        self._ready = asyncio.Event()
        self.published_total = 0
        self.dropped_total = 0

    def publish(self, topic: str, message) -> None:
        """Queue an event; never blocks (safe from any handler on the loop thread)."""
        if len(self._events) >= self._max:
            dropped = self._events.popleft()
            self.dropped_total += 1
            log.warning("event queue full (%d): dropped oldest %s", self._max, dropped.topic)
        self._events.append(Event(topic, message, time.time_ns()))
        self.published_total += 1
        self._ready.set()

    async def next(self) -> Event:
        """The oldest queued event, waiting until there is one."""
        while not self._events:
            self._ready.clear()
            await self._ready.wait()
        return self._events.popleft()

    def __len__(self) -> int:
        return len(self._events)
