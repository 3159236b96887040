"""The agent's Reaper: the only waitpid caller, for spawned children and adopted orphans.

Each test body runs in a forked child of pytest (`in_child`): a Reaper's waitpid(-1) would
otherwise reap children that other fixtures of this pytest process own. The child is made a
child-subreaper, as the dev-mode agent is, so orphaned grandchildren are re-parented to it.
"""

import asyncio
import os
import pickle
import signal
import time

import prctl
import pytest

from vmm_task.procfs import count_zombie_children
from vmm_task.reaper import Reaper


def in_child(body, timeout: float = 60.0):
    """Run `await body(reaper)` in a forked subreaper child; return its result or re-raise."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            prctl.set_child_subreaper(True)

            async def main():
                reaper = Reaper(keep_exits=getattr(body, "keep_exits", 4096))
                reaper.start()
                return await asyncio.wait_for(body(reaper), timeout)

            outcome = ("ok", asyncio.run(main()))
        except BaseException as e:  # reported to the parent, which fails the test with it
            outcome = ("error", repr(e))
        with os.fdopen(write_fd, "wb") as f:
            pickle.dump(outcome, f)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "error":
        pytest.fail(f"in child: {value}")
    return value


def test_spawned_child_exit_codes_and_signals():
    async def body(reaper):
        ok = await (await reaper.spawn(["sh", "-c", "exit 7"])).wait()
        killed = await (await reaper.spawn(["sh", "-c", "kill -TERM $$"])).wait()
        return ok.code, killed.code, ok.exited_at

    code, signalled, exited_at = in_child(body)
    assert code == 7
    assert signalled == 128 + signal.SIGTERM
    assert abs(exited_at / 1e9 - time.time()) < 60


def test_many_children_at_once_each_get_their_own_status():
    async def body(reaper):
        children = [await reaper.spawn(["sh", "-c", f"exit {i % 200}"]) for i in range(300)]
        statuses = await asyncio.gather(*(c.wait() for c in children))
        return [s.code for s in statuses], reaper.reaped_total, reaper.pending

    codes, reaped, pending = in_child(body)
    assert codes == [i % 200 for i in range(300)]
    assert reaped == 300 and pending == 0


def test_orphaned_grandchildren_are_reaped_and_waitable():
    """sh starts background sleeps and exits at once: the sleeps are re-parented to us."""
    async def body(reaper):
        read_fd, write_fd = os.pipe()
        shell = await reaper.spawn(
            ["sh", "-c", "for i in 1 2 3 4 5; do (sleep 0.3; exit $i) & echo $!; done"],
            stdout=write_fd)
        os.close(write_fd)
        await shell.wait()
        output = b""
        while chunk := os.read(read_fd, 4096):
            output += chunk
        orphans = [int(line) for line in output.split()]
        statuses = await asyncio.gather(*(reaper.wait_pid(pid) for pid in orphans))
        return [s.code for s in statuses], count_zombie_children(os.getpid())

    codes, zombies = in_child(body)
    assert sorted(codes) == [1, 2, 3, 4, 5]
    assert zombies == 0


def test_exit_reaped_before_anyone_asked_is_delivered():
    async def body(reaper):
        read_fd, write_fd = os.pipe()
        shell = await reaper.spawn(["sh", "-c", "(sleep 0.1; exit 42) & echo $!"], stdout=write_fd)
        os.close(write_fd)
        await shell.wait()
        orphan = int(os.read(read_fd, 100))
        while os.path.exists(f"/proc/{orphan}"):  # until reaped with nobody waiting (in_child's
            await asyncio.sleep(0.02)             # deadline bounds it): a zombie's entry stays
        first = await reaper.wait_pid(orphan)
        again = await reaper.wait_pid(orphan)  # kept, not consumed: Wait may be called twice
        return first.code, again == first

    assert in_child(body) == (42, True)


def test_wait_pid_of_a_spawned_child_and_of_an_unknown_pid():
    async def body(reaper):
        child = await reaper.spawn(["sh", "-c", "sleep 0.1; exit 3"])
        via_pid = await reaper.wait_pid(child.pid)
        try:
            await reaper.wait_pid(2**22 + 12345)  # above pid_max: never alive, never reaped
        except ProcessLookupError as e:
            return via_pid.code, str(e)
        return via_pid.code, None

    code, error = in_child(body)
    assert code == 3
    assert error and "no recorded exit" in error


def test_early_exit_store_is_bounded():
    async def body(reaper):
        for i in range(10):
            await (await reaper.spawn(["true"])).wait()
        return len(reaper._early)

    body.keep_exits = 4
    assert in_child(body) == 4


def test_spawn_failure_raises_and_leaks_no_fd():
    async def body(reaper):
        before = len(os.listdir("/proc/self/fd"))
        read_fd, write_fd = os.pipe()
        try:
            await reaper.spawn(["/nonexistent/program"], stdout=write_fd)
        except FileNotFoundError:
            raised = True
        else:
            raised = False
        os.close(read_fd)
        os.close(write_fd)
        return raised, len(os.listdir("/proc/self/fd")) - before

    assert in_child(body) == (True, 0)


def test_fd_mapping_and_default_signal_dispositions():
    """fds={3: w} reaches the child as fd 3; the child does not inherit the signals we ignore
    (SigIgn has none of the standard signals 1-31 set)."""
    async def body(reaper):
        fd3_r, fd3_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as PID 1 does
        child = await reaper.spawn(
            ["sh", "-c", "grep SigIgn /proc/self/status; echo extra >&3"],
            stdout=stdout_w, fds={3: fd3_w})
        os.close(fd3_w)
        os.close(stdout_w)
        await child.wait()
        return os.read(fd3_r, 100), os.read(stdout_r, 100)

    on_fd3, on_stdout = in_child(body)
    assert on_fd3 == b"extra\n"
    label, mask = on_stdout.split()
    assert label == b"SigIgn:" and int(mask, 16) & 0x7FFFFFFF == 0

