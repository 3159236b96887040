"""OOM kills in a container's cgroup, reported through a callback (the Task service publishes
TaskOOM). cgroup v2: inotify on `memory.events`, an event per increase of `oom_kill`. cgroup v1:
an eventfd registered for `memory.oom_control` through `cgroup.event_control`."""

import asyncio
import logging
import os
from typing import Callable, Optional

from .cgroups import Cgroup, flat_keyed

log = logging.getLogger(__name__)

IN_MODIFY = 0x2
IN_NONBLOCK_CLOEXEC = os.O_NONBLOCK | os.O_CLOEXEC


class OomWatcher:
    """Calls `on_oom()` on the event loop for each OOM kill until `close()`."""

    def __init__(self, cgroup: Cgroup, on_oom: Callable[[], None]):
        self._cgroup = cgroup
        self._on_oom = on_oom
        self._fds: list[int] = []
        self._loop = asyncio.get_running_loop()
        self._kills = 0
        if cgroup.version == 2:
            self._watch_v2()
        else:
            self._watch_v1()

    def _watch_v2(self) -> None:
        events = os.path.join(self._cgroup.dir(""), "memory.events")
        fd = _inotify("inotify_init1", "", IN_NONBLOCK_CLOEXEC)
        self._fds.append(fd)
        try:
            _inotify("inotify_add_watch", events, fd, events.encode(), IN_MODIFY)
        except OSError:
            self.close()
            raise
        self._kills = self._v2_kills()
        self._loop.add_reader(fd, self._on_v2_change, fd)

    def _v2_kills(self) -> int:
        return flat_keyed(self._cgroup.read("", "memory.events")).get("oom_kill", 0)

    def _on_v2_change(self, fd: int) -> None:
        try:
            while os.read(fd, 4096):
                pass
        except BlockingIOError:
            pass
        self._fire_new_v2_kills()

    def _fire_new_v2_kills(self) -> None:
        kills = self._v2_kills()
        for _ in range(max(0, kills - self._kills)):
            self._fire()
        self._kills = max(kills, self._kills)

    def catch_up(self) -> None:
        """Report the OOM kills counted but not yet notified, before the exit they caused is
        published. The kernel counts the kill before its victim dies, but notifies a cgroup
        file's watchers later, from a workqueue and at most once per 10 ms (an `oom` event just
        before defers the `oom_kill` one): the victim's exit can be reaped first, and a TaskExit
        before its TaskOOM shows the kubelet an "Error" where it should see "OOMKilled"."""
        if not self._fds:
            return  # closed
        try:
            if self._cgroup.version == 2:
                self._fire_new_v2_kills()
            else:
                self._on_v1_event(self._fds[-1])
        except OSError as e:  # the cgroup is gone: nothing more to report
            log.debug("OOM catch-up of %s: %s", self._cgroup.dirs, e)

    def _watch_v1(self) -> None:
        directory = self._cgroup.dir("memory")
        if directory is None:
            raise OSError("no v1 memory cgroup to watch")
        control = os.open(os.path.join(directory, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
        self._fds.append(control)
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._fds.append(efd)
        try:
            with open(os.path.join(directory, "cgroup.event_control"), "w") as f:
                f.write(f"{efd} {control}")
        except OSError:
            self.close()
            raise
        self._loop.add_reader(efd, self._on_v1_event, efd)

    def _on_v1_event(self, efd: int) -> None:
        try:
            count = os.eventfd_read(efd)
        except BlockingIOError:
            return
        # the eventfd also fires once when the cgroup is removed: that is no OOM
        if os.path.isdir(self._cgroup.dir("memory")):
            for _ in range(count):
                self._fire()
        else:
            self.close()

    def _fire(self) -> None:
        try:
            self._on_oom()
        except Exception:  # a faulty callback must not stop the watching (nor the agent)
            log.exception("OOM callback failed")

    def close(self) -> None:
        for fd in self._fds:
            try:
                self._loop.remove_reader(fd)
            except (ValueError, RuntimeError):
                pass
            os.close(fd)
        self._fds.clear()


def _inotify(name: str, what: str, *args) -> int:
    """libc's inotify call `name` (the os module has none); OSError naming it on failure."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    result = getattr(libc, name)(*args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name} {what}: {os.strerror(err)}")
    return result


def watch(cgroup: Optional[Cgroup], on_oom: Callable[[], None]) -> Optional[OomWatcher]:
    """A watcher, or None (logged) when the cgroup has no memory controller to watch."""
    if cgroup is None:
        return None
    try:
        return OomWatcher(cgroup, on_oom)
    except OSError as e:
        log.warning("no OOM notifications for %s: %s", cgroup.dirs, e)
        return None
