"""A pod's virtiofsd killed while the daemon runs: the containers lost their rootfs, so the pod
ends as on a VMM death (VM stopped, NOTREADY, Waits return, exits published, others untouched),
whether the daemon spawned that virtiofsd or adopted it (pidfd) after a restart.

Real daemon, real QEMU (TCG) and virtiofsd; containerd's Events service is the stand-in from
test_sandboxer.py.
"""

import concurrent.futures
import os
import signal

from leak_guard import mounts_left
from test_sandboxer import NS, _long_running_pod, env  # noqa: F401  (env: the fixture)
from test_sandboxer_restart import _alive, _crash_daemon, _exit_statuses, _gone, _helpers

from vmm_common.protos.containerd.services.sandbox.v1 import sandbox_pb2 as sb
from vmm_common.protos.containerd.task.v3 import shim_pb2 as task

UNKNOWN_EXIT = 255


def _assert_ended_by_virtiofsd(env, sid, qemu_pid) -> None:
    status = env.status(sid, verbose=True)
    assert status.state == "SANDBOX_NOTREADY"
    assert status.info["exit_status"] == str(UNKNOWN_EXIT)
    assert "virtiofsd ended" in status.info["exit_reason"], status.info["exit_reason"]
    assert _gone([qemu_pid]), "the VM is stopped"


def _shutdown(env, sid) -> None:
    env.cri.controller.Shutdown(sb.ControllerShutdownRequest(sandbox_id=sid), metadata=NS, timeout=60)
    assert not (env.daemon.state / sid).exists()


def test_virtiofsd_killed_ends_the_pod(env):
    started, tasks, b = _long_running_pod(env, "fsd")
    _long_running_pod(env, "bystander")
    helpers = _helpers(env, "fsd")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        task_wait = pool.submit(tasks.Wait, task.WaitRequest(id=b.id), metadata=NS, timeout=60)
        pod_wait = pool.submit(env.cri.controller.Wait, sb.ControllerWaitRequest(sandbox_id="fsd"),
                               metadata=NS, timeout=60)
        os.kill(helpers["virtiofsd"], signal.SIGKILL)
        assert task_wait.result().exit_status == UNKNOWN_EXIT
        assert pod_wait.result().exit_status == UNKNOWN_EXIT
    _assert_ended_by_virtiofsd(env, "fsd", helpers["qemu"])
    assert _exit_statuses(env, b.id) == [UNKNOWN_EXIT]
    state = tasks.State(task.StateRequest(id=b.id), metadata=NS, timeout=10)
    assert (state.status, state.exit_status) == (3, UNKNOWN_EXIT)  # STOPPED, answered without the VM
    assert env.status("bystander").state == "SANDBOX_READY"
    _shutdown(env, "fsd")
    assert all("/bystander/" in p for p in mounts_left(env.daemon.state))
    env.cri.remove_pod("bystander")
    assert mounts_left(env.work) == []


def test_adopted_virtiofsd_killed_ends_the_pod(env):
    started, tasks, b = _long_running_pod(env, "adopted")
    helpers = _helpers(env, "adopted")
    _crash_daemon(env)
    env.daemon.start()
    assert env.status("adopted").state == "SANDBOX_READY"
    os.kill(helpers["virtiofsd"], signal.SIGKILL)
    wait = env.cri.controller.Wait(sb.ControllerWaitRequest(sandbox_id="adopted"), metadata=NS, timeout=60)
    assert wait.exit_status == UNKNOWN_EXIT
    _assert_ended_by_virtiofsd(env, "adopted", helpers["qemu"])
    assert _exit_statuses(env, b.id) == [UNKNOWN_EXIT]
    _shutdown(env, "adopted")
    # The pod's VM is closed by then (its watch closes it after the exit: Shutdown waits for that),
    # and with it the node's vsock backend, its last VM gone. Looked at at once, not waited for:
    # a daemon stopped now would leave whatever is still running.
    assert not _alive(helpers["vsock"]), "the vsock backend outlived the Shutdown of its last pod"
    assert mounts_left(env.work) == []
