"""The agent's shared-directory probe (vmm_task/sharefs_probe.py): a statfs in a thread, bounded.

A hung virtiofsd cannot be made on a host without a guest kernel's FUSE client, so here the
statfs that hangs is a stand-in that blocks until released; tests/vm/test_sandboxer_sharefs_health.py
stops a real virtiofsd under a real guest."""
import asyncio
import errno
import threading

from vmm_task import sharefs_probe
from vmm_task.sharefs_probe import SharefsProbe


def test_a_directory_that_answers_is_healthy(tmp_path):
    assert asyncio.run(SharefsProbe(str(tmp_path)).check(5.0)) == ""


def test_a_hung_server_is_reported_with_one_thread_blocked_until_it_answers(tmp_path, monkeypatch):
    release, calls = threading.Event(), []

    def hung_statvfs(path):
        calls.append(path)
        release.wait(10)

    monkeypatch.setattr(sharefs_probe.os, "statvfs", hung_statvfs)
    probe = SharefsProbe(str(tmp_path))

    async def scenario():
        first = await probe.check(0.2)
        second = await probe.check(0.2)
        assert calls == [str(tmp_path)]  # the second check waited on the same statfs, no new thread
        release.set()
        third = await probe.check(5.0)
        return first, second, third

    first, second, third = asyncio.run(scenario())
    assert f"the shared directory {tmp_path} has not answered a statfs for" in first
    assert "its server on the host is not serving" in second
    assert third == ""


def test_a_failing_statfs_is_named(tmp_path, monkeypatch):
    def failing_statvfs(path):
        raise OSError(errno.ENOTCONN, "not connected")

    monkeypatch.setattr(sharefs_probe.os, "statvfs", failing_statvfs)
    reason = asyncio.run(SharefsProbe(str(tmp_path)).check(5.0))
    assert reason == f"statfs of the shared directory {tmp_path} failed: Transport endpoint is not connected"
