"""The event loop of the vsock backend process: the callback half of asyncio's, nothing more.

The device (device.py) and the vhost-user session (backend.py) only ever call `add_reader`,
`remove_reader`, `add_writer`, `remove_writer`, `call_soon` and `call_later(...).cancel()`,
so they run on asyncio's loop in a daemon or a test and on this one in the backend process
(serve.py), which then never imports asyncio: ~3 MB less PSS (docs/benchmarks.md, "Host memory").
A callback that raises is logged and the loop goes on, as asyncio's does.
"""
import heapq
import itertools
import logging
import selectors
import signal
import socket
import time

log = logging.getLogger(__name__)


class Handle:
    """A callback with its arguments; cancelled ones never run (a reader removed in the same
    turn that found its fd ready, a timer cancelled before it is due)."""
    __slots__ = ("callback", "args", "cancelled")

    def __init__(self, callback, args):
        self.callback, self.args, self.cancelled = callback, args, False

    def cancel(self) -> None:
        self.cancelled = True


class Reactor:
    def __init__(self):
        self._selector = selectors.DefaultSelector()
        self._ready = []             # Handles to run on the next turn
        self._timers = []            # heap of (when, sequence, Handle)
        self._sequence = itertools.count()
        self._signals = {}
        self._wakeup = None          # socketpair: the signal handler's byte lands in [0]
        self._running = False

    def time(self) -> float:
        return time.monotonic()

    # -- fds --------------------------------------------------------------------------

    def add_reader(self, fd: int, callback, *args) -> None:
        self._watch(fd, 0, Handle(callback, args))

    def add_writer(self, fd: int, callback, *args) -> None:
        self._watch(fd, 1, Handle(callback, args))

    def remove_reader(self, fd: int) -> bool:
        return self._unwatch(fd, 0)

    def remove_writer(self, fd: int) -> bool:
        return self._unwatch(fd, 1)

    def _watch(self, fd: int, which: int, handler) -> None:
        try:
            key = self._selector.get_key(fd)
        except KeyError:
            handlers = [None, None]
            handlers[which] = handler
            self._selector.register(fd, _events(handlers), handlers)
            return
        if key.data[which] is not None:
            key.data[which].cancel()
        key.data[which] = handler
        self._selector.modify(fd, _events(key.data), key.data)

    def _unwatch(self, fd: int, which: int) -> bool:
        try:
            key = self._selector.get_key(fd)
        except KeyError:
            return False
        handler = key.data[which]
        if handler is None:
            return False
        handler.cancel()
        key.data[which] = None
        if key.data == [None, None]:
            self._selector.unregister(fd)
        else:
            self._selector.modify(fd, _events(key.data), key.data)
        return True

    # -- calls ------------------------------------------------------------------------

    def call_soon(self, callback, *args) -> Handle:
        handle = Handle(callback, args)
        self._ready.append(handle)
        return handle

    def call_later(self, delay: float, callback, *args) -> Handle:
        handle = Handle(callback, args)
        heapq.heappush(self._timers, (self.time() + delay, next(self._sequence), handle))
        return handle

    def add_signal_handler(self, signum: int, callback) -> None:
        """`callback()` runs on the loop (not in the signal handler) after `signum` arrives."""
        if self._wakeup is None:
            self._wakeup = socket.socketpair()
            for end in self._wakeup:
                end.setblocking(False)
            signal.set_wakeup_fd(self._wakeup[1].fileno())
            self.add_reader(self._wakeup[0].fileno(), self._on_signals)
        self._signals[signum] = callback
        signal.signal(signum, lambda *_: None)  # the wakeup fd carries the number

    def _on_signals(self) -> None:
        try:
            received = self._wakeup[0].recv(64)
        except BlockingIOError:
            return
        for signum in received:
            if signum in self._signals:
                self.call_soon(self._signals[signum])

    # -- running ----------------------------------------------------------------------

    def run(self) -> None:
        """Turn until `stop()`."""
        self._running = True
        while self._running:
            self._turn()

    def stop(self) -> None:
        self._running = False

    def close(self) -> None:
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            for end in self._wakeup:
                end.close()
        self._selector.close()

    def _turn(self) -> None:
        timeout = 0 if self._ready else None
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if self._timers and timeout is None:
            timeout = max(0.0, self._timers[0][0] - self.time())
        for key, events in self._selector.select(timeout):
            for which, mask in ((0, selectors.EVENT_READ), (1, selectors.EVENT_WRITE)):
                handler = key.data[which]
                if events & mask and handler is not None:
                    self._ready.append(handler)
        now = self.time()
        while self._timers and self._timers[0][0] <= now:
            self._ready.append(heapq.heappop(self._timers)[2])
        ready, self._ready = self._ready, []
        for handle in ready:
            if handle.cancelled:
                continue
            try:
                handle.callback(*handle.args)
            except Exception:  # noqa: BLE001 - one bad callback must not end every VM's vsock
                log.exception("callback %r failed", handle.callback)


def _events(handlers) -> int:
    return (selectors.EVENT_READ if handlers[0] else 0) | (selectors.EVENT_WRITE if handlers[1] else 0)
