"""The daemon watches its helper processes through pidfds: no thread per child (daemon.py)."""
import asyncio
import sys
import threading

from host_sandboxer.daemon import watch_children_with_pidfds


def test_children_are_watched_without_a_thread_each():
    async def scenario():
        watch_children_with_pidfds()
        before = threading.active_count()
        children = [await asyncio.create_subprocess_exec("sleep", "0.3") for _ in range(4)]
        during = threading.active_count()
        statuses = await asyncio.gather(*(child.wait() for child in children))
        return before, during, statuses
    try:
        before, during, statuses = asyncio.run(scenario())
    finally:
        if sys.version_info < (3, 12):
            asyncio.set_child_watcher(None)  # the next test's loop gets the default again
    assert statuses == [0, 0, 0, 0]
    assert during == before
