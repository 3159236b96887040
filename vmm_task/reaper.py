"""The agent's only `waitpid` caller.

As PID 1 (and as child-subreaper in dev mode) every orphan in the guest is re-parented to us, so
one global `waitpid(-1, WNOHANG)` loop on SIGCHLD reaps everything. Any other waitpid (asyncio's
child watchers, `subprocess.Popen.wait`) would race with it and lose exit statuses, so:

- our own children are started with `Reaper.spawn` (posix_spawn, no waitpid behind our back);
- processes that become our children later (containers re-parented when crun exits) are awaited
  with `Reaper.wait_pid`; an exit reaped before anyone asked is kept for a while and delivered.

All bookkeeping runs on the event loop thread: the SIGCHLD handler is an asyncio signal handler
and `spawn` registers the pid before the loop can reap it, so there is no window to lose an exit.
"""

import asyncio
import fcntl
import os
import signal
import time
from collections import OrderedDict, namedtuple
from collections.abc import Mapping, Sequence

# Dispositions a child must not inherit from us: PID 1 ignores terminal/termination signals and
# CPython ignores SIGPIPE/SIGXFSZ; exec keeps SIG_IGN, so reset them explicitly.
_CHILD_DEFAULT_SIGNALS = (
    signal.SIGPIPE, signal.SIGXFSZ, signal.SIGHUP, signal.SIGINT, signal.SIGTERM,
    signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD,
)


# `code`: exit code, or 128 + signal number; `exited_at`: time.time_ns() when reaped.
# (collections' namedtuple: the guest agent does not import typing before ready)
ExitStatus = namedtuple("ExitStatus", "code exited_at")


def _exit_code(wait_status: int) -> int:
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


class ChildProcess:
    """A process started by `Reaper.spawn`."""

    __slots__ = ("pid", "argv", "_exit")

    def __init__(self, pid: int, argv: Sequence[str], exit_future: asyncio.Future):
        self.pid = pid
        self.argv = list(argv)
        self._exit = exit_future

    @property
    def status(self) -> ExitStatus | None:
        """The exit status once reaped, else None."""
        return self._exit.result() if self._exit.done() else None

    async def wait(self) -> ExitStatus:
        # shield: a caller's timeout must not cancel the future other waiters share
        return await asyncio.shield(self._exit)


class Reaper:
    """Reaps every child of this process; see the module docstring."""

    def __init__(self, keep_exits: int = 4096, keep_seconds: float = 600.0):
        self._loop: asyncio.AbstractEventLoop | None = None
        self._children: dict[int, asyncio.Future] = {}   # spawned by us, not yet reaped
        self._waiters: dict[int, list[asyncio.Future]] = {}  # wait_pid callers
        self._early: "OrderedDict[int, tuple[ExitStatus, float]]" = OrderedDict()
        self._keep_exits = keep_exits
        self._keep_seconds = keep_seconds
        self.reaped_total = 0

    def start(self) -> None:
        """Install the SIGCHLD handler on the running loop and reap what already exited."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._loop = None

    # -- starting processes -------------------------------------------------------------------

    async def spawn(
        self,
        argv: Sequence[str],
        *,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        fds: Mapping[int, int] | None = None,
        env: Mapping[str, str] | None = None,
        setsid: bool = False,
    ) -> ChildProcess:
        """Start `argv` (PATH lookup when argv[0] has no '/').

        stdin/stdout/stderr: parent fds to install as 0/1/2 (None: inherit ours). `fds` maps more
        child fd numbers to parent fds; every other fd of ours is close-on-exec and not passed.
        Raises OSError when the program cannot be executed.
        """
        self._require_started()
        mapping = {0: stdin, 1: stdout, 2: stderr, **(fds or {})}
        mapping = {child: parent for child, parent in mapping.items() if parent is not None}
        # Duplicate sources above every target first so dup2 order cannot clobber a source.
        floor = max(mapping, default=2) + 1
        temps = {child: fcntl.fcntl(parent, fcntl.F_DUPFD_CLOEXEC, floor)
                 for child, parent in mapping.items()}
        try:
            spawn = os.posix_spawn if "/" in argv[0] else os.posix_spawnp
            pid = spawn(
                argv[0], list(argv), dict(os.environ if env is None else env),
                file_actions=[(os.POSIX_SPAWN_DUP2, tmp, child) for child, tmp in temps.items()],
                setsigdef=_CHILD_DEFAULT_SIGNALS,
                setsigmask=(),
                setsid=setsid,
            )
        finally:
            for tmp in temps.values():
                os.close(tmp)
        future = self._loop.create_future()
        self._children[pid] = future
        return ChildProcess(pid, argv, future)

    # -- adopted processes --------------------------------------------------------------------

    def wait_pid(self, pid: int) -> asyncio.Future:
        """A future resolving to the ExitStatus of `pid` (a process that is, or will become, our
        child). Resolved at once when its exit was already reaped; fails with ProcessLookupError
        when the pid is neither alive nor known to have exited."""
        self._require_started()
        future = self._loop.create_future()
        if pid in self._children:
            self._children[pid].add_done_callback(lambda f: _copy_result(f, future))
            return future
        self._expire_early_exits()
        early = self._early.get(pid)
        if early is not None and _pid_exists(pid):
            # the pid was reused after the exit we stored: that status is not this process's
            del self._early[pid]
            early = None
        if early is not None:
            future.set_result(early[0])
        elif _pid_exists(pid):
            self._waiters.setdefault(pid, []).append(future)
        else:
            future.set_exception(ProcessLookupError(f"no process {pid} and no recorded exit"))
        return future

    # -- reaping ------------------------------------------------------------------------------

    def reap(self) -> None:
        """Collect every exited child (SIGCHLD handler; safe to call at any time)."""
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            self.reaped_total += 1
            self._deliver(pid, ExitStatus(_exit_code(wait_status), time.time_ns()))

    def _deliver(self, pid: int, status: ExitStatus) -> None:
        child = self._children.pop(pid, None)
        if child is not None:
            child.set_result(status)
        for future in self._waiters.pop(pid, []):
            if not future.done():
                future.set_result(status)
        self._early.pop(pid, None)
        self._early[pid] = (status, time.monotonic())
        while len(self._early) > self._keep_exits:
            self._early.popitem(last=False)

    def _expire_early_exits(self) -> None:
        deadline = time.monotonic() - self._keep_seconds
        while self._early:
            pid, (_, reaped_at) = next(iter(self._early.items()))
            if reaped_at >= deadline:
                return
            del self._early[pid]

    def _require_started(self) -> None:
        if self._loop is None:
            raise RuntimeError("Reaper.start() has not been called on the running loop")

    # -- introspection (health service, tests) -----------------------------------------------

    @property
    def pending(self) -> int:
        """Processes someone is waiting for (spawned children + wait_pid targets)."""
        return len(self._children) + len(self._waiters)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _copy_result(source: asyncio.Future, target: asyncio.Future) -> None:
    if not target.done():
        target.set_result(source.result())

