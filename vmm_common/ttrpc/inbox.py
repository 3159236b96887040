"""The bounded queue of payloads received on one stream, ended by EOF or an error."""
import asyncio
import collections

from .errors import RpcError

# How many received messages a stream holds before the connection's reader waits
# (then gives up on that stream), as containerd/ttrpc does.
DEPTH = 64
FULL_WAIT_S = 1.0


class Inbox:
    def __init__(self, depth: int = DEPTH):
        self._items: collections.deque[bytes] = collections.deque()
        self._depth = depth
        self._end: RpcError | bool = False  # True: clean end; RpcError: failed
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    @property
    def ended(self) -> bool:
        return self._end is not False

    async def put(self, item: bytes, wait: float = FULL_WAIT_S) -> bool:
        """Queue one payload; False if the reader did not make room within `wait`."""
        if len(self._items) >= self._depth:
            self._writable.clear()
            try:
                await asyncio.wait_for(self._writable.wait(), wait)
            except asyncio.TimeoutError:
                return False
        self._items.append(item)
        self._readable.set()
        return True

    def end(self, error: RpcError | None = None) -> None:
        """No more items will come; `error` is raised to the reader after the queued ones."""
        if self._end is False:
            self._end = error or True
            self._readable.set()

    async def get(self) -> bytes | None:
        """The next payload; None after a clean end; raises the RpcError it ended with."""
        while not self._items and self._end is False:
            self._readable.clear()
            await self._readable.wait()
        if self._items:
            item = self._items.popleft()
            self._writable.set()
            return item
        if isinstance(self._end, RpcError):
            raise self._end
        return None
