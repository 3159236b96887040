"""Waiting for what the host hot-plugs: the guest learns of a port or disk a moment after the
host's QMP call returned, and sysfs is the one place to look (no udev in the guest)."""

import asyncio
from typing import Callable, Optional, TypeVar

T = TypeVar("T")


async def poll(find: Callable[[], Optional[T]], timeout: float, interval: float) -> Optional[T]:
    """The first non-None `find()`, tried every `interval` seconds; None after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = find()
        if found is not None or loop.time() >= deadline:
            return found
        await asyncio.sleep(interval)
