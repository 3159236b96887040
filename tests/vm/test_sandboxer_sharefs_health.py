"""A pod's virtiofsd that hangs (SIGSTOP: alive, not serving) is seen through the guest: the pod
turns SANDBOX_NOTREADY with the reason in Status verbose, not ended, and READY again once
virtiofsd is continued; the containers' files are then served as before.

Real daemon (shared-directory check every second), real QEMU (TCG), virtiofsd and guest agent.
"""

import os
import signal
import time

import pytest
from leak_guard import mounts_left
from test_sandboxer import _long_running_pod, env  # noqa: F401  (env: the fixture)
from test_sandboxer_restart import _exec, _helpers


pytestmark = [pytest.mark.vm, pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")]


def _status_until(env, sid, state, timeout=40.0):
    deadline = time.monotonic() + timeout
    while True:
        status = env.status(sid, verbose=True)
        if status.state == state or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


@pytest.mark.parametrize("env", [{"settings": {"sharefs": "check_interval_s = 1"}}], indirect=True)
def test_a_stopped_virtiofsd_makes_the_pod_notready_until_it_serves_again(env):
    started, tasks, b = _long_running_pod(env, "hung")
    fsd = _helpers(env, "hung")["virtiofsd"]
    assert env.status("hung").state == "SANDBOX_READY"
    os.killpg(fsd, signal.SIGSTOP)  # virtiofsd and the child serving in its sandbox
    try:
        status = _status_until(env, "hung", "SANDBOX_NOTREADY")
        assert status.state == "SANDBOX_NOTREADY"
        reason = status.info["unhealthy"]
        assert "has not answered a statfs" in reason and "virtiofsd is stopped on the host" in reason, reason
        assert status.info["exit_status"] == "" and os.path.exists(f"/proc/{started.pid}")  # not ended
    finally:
        os.killpg(fsd, signal.SIGCONT)
    status = _status_until(env, "hung", "SANDBOX_READY")
    assert (status.state, status.info["unhealthy"]) == ("SANDBOX_READY", "")
    assert _exec(tasks, b, "after", ["cat", "/etc/hostname"]) == (b"hung-c\n", 0)  # the rootfs is served
    env.cri.remove_pod("hung")
    assert mounts_left(env.work) == []
