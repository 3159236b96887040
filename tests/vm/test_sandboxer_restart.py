"""vmm-sandboxer restarts (kill -9) with pods running: the new daemon takes them over from
STATE_DIR with the very same VM (QMP, console and vsock reconnect), and cleans up what died.
containerd's task connections (our ttrpc client, as containerd dials `ttrpc+unix://`) are held
by the task relay and never see the restart: a Wait made before it is answered after it.

Real daemon, real QEMU (TCG), virtiofsd, hybrid vsock backend and task relay processes;
containerd's Events service is the stand-in from test_sandboxer.py.
"""

import concurrent.futures
import json
import os
import signal
import socket
import time

import grpc
import pytest

from leak_guard import mounts_left
from test_sandboxer import NS, _long_running_pod, demo, env  # noqa: F401  (env: the fixture)

from host_sandboxer.sandbox import manager
from host_sandboxer.vmm.template import TEMPLATES_DIR, TemplateStore
from vmm_common.protos.containerd.events import task_pb2 as events
from vmm_common.protos.containerd.services.sandbox.v1 import sandbox_pb2 as sb
from vmm_common.protos.containerd.task.v3 import shim_pb2 as task

RUNNING, STOPPED = 2, 3


def _state_left(env) -> list:
    """The state dir's entries once every pod is gone; the node's templates stay by design
    ([vm] template, host_sandboxer/vmm/template.py)."""
    return [p for p in env.daemon.state.iterdir() if p.name != TEMPLATES_DIR]


def _helpers(env, sid) -> dict[str, int]:
    """The pod's QEMU and virtiofsd pids, from its state file, and the daemon's vsock backend's."""
    record = json.loads((env.daemon.state / sid / "state.json").read_text())["vm"]
    backend = json.loads((env.daemon.state / "vsock-backend.json").read_text())
    return {"qemu": record["qemu"]["pid"], "virtiofsd": record["virtiofsd"]["pid"], "vsock": backend["pid"]}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone(pids, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(_alive(p) for p in pids)


def _exit_statuses(env, container_id: str, timeout: float = 20.0) -> list[int]:
    """Exit statuses published for the init process of `container_id` until the first one
    arrives (or the timeout)."""
    deadline, found = time.monotonic() + timeout, []
    while not found and time.monotonic() < deadline:
        exits = [events.TaskExit.FromString(e.value) for _, t, e in env.events.topics({"/tasks/exit"}, 1.0)
                 if t == "/tasks/exit"]
        found = [x.exit_status for x in exits if x.container_id == x.id == container_id]
    return found


def _crash_daemon(env) -> None:
    env.daemon.proc.kill()
    env.daemon.proc.wait()


def _exec(tasks, bundle, exec_id, args) -> tuple[bytes, int]:
    out = bundle.fifo(f"{exec_id}-out")
    reader = demo.FifoReader(out)
    request = task.ExecProcessRequest(id=bundle.id, exec_id=exec_id, stdout=out)
    request.spec.type_url = demo.PROCESS_SPEC_TYPE
    request.spec.value = json.dumps({"args": args, "cwd": "/", "env": ["PATH=/bin"],
                                     "user": {"uid": 0, "gid": 0}}).encode()
    tasks.Exec(request, metadata=NS, timeout=60)
    tasks.Start(task.StartRequest(id=bundle.id, exec_id=exec_id), metadata=NS, timeout=60)
    status = tasks.Wait(task.WaitRequest(id=bundle.id, exec_id=exec_id), metadata=NS, timeout=60).exit_status
    tasks.Delete(task.DeleteRequest(id=bundle.id, exec_id=exec_id), metadata=NS, timeout=60)
    return reader.result(), status


def test_daemon_killed_running_pods_are_taken_over(env):
    started, tasks, b = _long_running_pod(env, "survivor")
    _long_running_pod(env, "bystander")  # the vsock backend serves both
    helpers = _helpers(env, "survivor")
    _crash_daemon(env)
    assert all(_alive(p) for p in helpers.values()), "the pod's processes outlive the daemon"
    env.daemon.start()

    status = env.status("survivor", verbose=True)
    assert (status.state, status.pid) == ("SANDBOX_READY", started.pid)
    assert "recovered_at_ns" in status.info
    tasks = demo.Cri.task_client(started.address)  # the task address is served again
    assert tasks.State(task.StateRequest(id=b.id), metadata=NS, timeout=10).status == RUNNING
    assert _exec(tasks, b, "after", ["sh", "-c", "echo exec-after-restart"]) == (b"exec-after-restart\n", 0)
    # a new container: the shared directory (virtiofsd) and stdio relays work as before
    fresh = env.bundle("fresh", ["cat", "/etc/hostname"], started.pid)
    assert demo.run_container(tasks, fresh) == (b"fresh\n", b"", 0)
    tasks.Kill(task.KillRequest(id=b.id, signal=signal.SIGKILL, all=True), metadata=NS, timeout=10)
    assert tasks.Wait(task.WaitRequest(id=b.id), metadata=NS, timeout=60).exit_status == 137
    tasks.Delete(task.DeleteRequest(id=b.id), metadata=NS, timeout=60)
    assert _exit_statuses(env, b.id) == [137], "the guest's events are pumped again"

    env.cri.remove_pod("survivor")
    assert _gone([helpers["qemu"], helpers["virtiofsd"]]), f"left running: {helpers}"
    assert not (env.daemon.state / "survivor").exists()
    assert env.status("bystander").state == "SANDBOX_READY" and _alive(helpers["vsock"])
    env.cri.remove_pod("bystander")
    assert _gone([helpers["vsock"]]), "the backend ends with the last VM"
    assert _state_left(env) == []
    assert mounts_left(env.work) == []


def test_daemon_stopped_with_sigterm_leaves_its_pods_running(env):
    """A graceful stop (an upgrade: stop the old daemon, start the new) stops no pod: asyncio's
    teardown would kill every child whose subprocess transport it closes, QEMU included."""
    started, tasks, b = _long_running_pod(env, "upgraded")
    helpers = _helpers(env, "upgraded")
    env.daemon.proc.send_signal(signal.SIGTERM)
    assert env.daemon.proc.wait(30) == 0
    time.sleep(1.0)  # what asyncio's teardown killed would be dead (a zombie) by now
    assert all(_alive(p) for p in helpers.values()), f"a graceful stop killed: {helpers}"
    env.daemon.start()
    assert env.status("upgraded").state == "SANDBOX_READY"
    tasks = demo.Cri.task_client(started.address)
    assert tasks.State(task.StateRequest(id=b.id), metadata=NS, timeout=10).status == RUNNING
    assert _exec(tasks, b, "after", ["sh", "-c", "echo after-upgrade"]) == (b"after-upgrade\n", 0)
    env.cri.remove_pod("upgraded")
    assert _gone([helpers["qemu"], helpers["virtiofsd"]]), f"left running: {helpers}"


def test_a_wait_held_across_a_daemon_kill_returns_the_real_exit_status(env):
    """What containerd holds through a `kill -9` of the daemon: its connection, its Wait. The
    container ends on its own after the restart (an exec tells it to): the Wait made before the
    kill answers with its status, and its output before and after reaches the same FIFO."""
    started = env.cri.run_pod("held")
    tasks = demo.Cri.task_client(started.address)
    b = env.bundle("held-c", ["sh", "-c", "echo before; while [ ! -e /tmp/go ]; do sleep 0.2; done; "
                                          "echo after; exit 7"], started.pid)
    stdout = b.fifo("stdout")
    output = demo.FifoReader(stdout)
    tasks.Create(task.CreateTaskRequest(id=b.id, bundle=str(b.path), rootfs=b.rootfs, stdout=stdout),
                 metadata=NS, timeout=60)
    tasks.Start(task.StartRequest(id=b.id), metadata=NS, timeout=60)
    relay = json.loads((env.daemon.state / "task-relay.json").read_text())["pid"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        held = pool.submit(tasks.Wait, task.WaitRequest(id=b.id), metadata=NS)
        time.sleep(0.5)
        _crash_daemon(env)
        state_while_down = pool.submit(tasks.State, task.StateRequest(id=b.id), metadata=NS)
        env.daemon.start()
        assert state_while_down.result(60).status == RUNNING  # asked of nobody, answered by the new daemon
        assert not held.done()
        assert tasks.State(task.StateRequest(id=b.id), metadata=NS, timeout=10).status == RUNNING
        assert tasks.Pids(task.PidsRequest(id=b.id), metadata=NS, timeout=10).processes
        assert _exec(tasks, b, "go", ["touch", "/tmp/go"]) == (b"", 0)
        assert held.result(60).exit_status == 7
    assert output.result() == b"before\nafter\n"
    assert _alive(relay) and json.loads((env.daemon.state / "task-relay.json").read_text())["pid"] == relay
    tasks.Delete(task.DeleteRequest(id=b.id), metadata=NS, timeout=60)
    env.cri.remove_pod("held")
    assert _gone([relay]), "the relay ends with the last pod"
    assert _state_left(env) == []


def _qmp(env, sid, command):
    """One QMP command to the pod's QEMU, while no daemon holds its (single) QMP connection."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(env.daemon.state / sid / "qmp.sock"))
        replies = sock.makefile("rb")
        replies.readline()  # the greeting
        for execute in ("qmp_capabilities", command):
            sock.sendall(json.dumps({"execute": execute}).encode() + b"\n")
            while "return" not in (reply := json.loads(replies.readline())):
                assert "error" not in reply, reply


def test_a_restart_serves_the_controller_without_waiting_for_a_guest_that_does_not_answer(env):
    """Pods are taken over at once, each with its own deadline: a paused guest costs the restart
    RECOVERY_WAIT_S at most and is reported NOTREADY saying why, while the others are READY
    and answer; it is not stopped, and is READY once its guest answers again."""
    paused, _, _ = _long_running_pod(env, "paused")
    fine, tasks, b = _long_running_pod(env, "fine")
    _crash_daemon(env)
    _qmp(env, "paused", "stop")  # the guest's vCPUs stop: its agent cannot answer
    began = time.monotonic()
    env.daemon.start()  # returns when the socket is there: before the takeover, so containerd's
    listening = time.monotonic() - began  # dialer finds it at once; its calls are held meanwhile
    assert env.status("fine").state == "SANDBOX_READY"  # held until the takeover, not NOT_FOUND
    took = time.monotonic() - began
    assert took < manager.RECOVERY_WAIT_S + 5, f"the Controller answered {took:.1f} s after the restart"
    assert took - listening > manager.RECOVERY_WAIT_S / 2, \
        f"listening at {listening:.1f} s, answered at {took:.1f} s: the socket came only with the takeover"
    assert tasks.State(task.StateRequest(id=b.id), metadata=NS, timeout=10).status == RUNNING
    status = env.status("paused", verbose=True)
    assert status.state == "SANDBOX_NOTREADY" and status.pid == paused.pid
    assert "the restarted daemon" in status.info["unhealthy"], status.info["unhealthy"]
    assert _alive(paused.pid), "a guest that does not answer is not stopped"

    _crash_daemon(env)  # QMP is free again: the guest resumes, a new daemon takes it over
    _qmp(env, "paused", "cont")
    env.daemon.start()
    deadline = time.monotonic() + 60
    while env.status("paused").state != "SANDBOX_READY" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert env.status("paused", verbose=True).info["unhealthy"] == ""
    assert env.status("paused").state == "SANDBOX_READY"
    for sid in ("paused", "fine"):
        env.cri.remove_pod(sid)
    assert _state_left(env) == []


def test_vmm_died_while_the_daemon_was_down(env):
    started, tasks, b = _long_running_pod(env, "lost")
    helpers = _helpers(env, "lost")
    _crash_daemon(env)
    os.kill(started.pid, signal.SIGKILL)
    assert _gone([started.pid])
    env.daemon.start()

    assert env.status("lost").state == "SANDBOX_NOTREADY"
    wait = env.cri.controller.Wait(sb.ControllerWaitRequest(sandbox_id="lost"), metadata=NS, timeout=10)
    assert wait.exit_status == 255
    assert _exit_statuses(env, b.id) == [255]
    tasks = demo.Cri.task_client(started.address)
    assert tasks.State(task.StateRequest(id=b.id), metadata=NS, timeout=10).status == STOPPED
    assert tasks.Delete(task.DeleteRequest(id=b.id), metadata=NS, timeout=10).exit_status == 255
    env.cri.controller.Shutdown(sb.ControllerShutdownRequest(sandbox_id="lost"), metadata=NS, timeout=60)
    assert _gone(helpers.values()), f"left running: {helpers}"
    assert not (env.daemon.state / "lost").exists()
    assert mounts_left(env.work) == []


def test_vsock_backend_death_ends_the_pod(env):
    """The backend process is supervised: without it the VM is unreachable for good. (It
    serves every pod of the daemon: all of them would end alike.)"""
    started, tasks, b = _long_running_pod(env, "cutoff")
    helpers = _helpers(env, "cutoff")
    os.kill(helpers["vsock"], signal.SIGKILL)
    wait = env.cri.controller.Wait(sb.ControllerWaitRequest(sandbox_id="cutoff"), metadata=NS, timeout=30)
    assert wait.exit_status == 255
    assert env.status("cutoff").state == "SANDBOX_NOTREADY"
    assert tasks.Wait(task.WaitRequest(id=b.id), metadata=NS, timeout=10).exit_status == 255
    assert _gone(helpers.values()), "the unreachable VM is stopped"
    env.cri.controller.Shutdown(sb.ControllerShutdownRequest(sandbox_id="cutoff"), metadata=NS, timeout=60)
    assert mounts_left(env.work) == []


def _processes_naming(directory) -> list[int]:
    marker = f"{directory}/".encode()
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker in f.read():
                    pids.append(int(entry))
        except OSError:
            pass
    return pids


def test_daemon_killed_inside_start_leaves_nothing_running(env):
    """The pod is still `created` on disk but its QEMU was spawned: the next daemon kills what
    names the pod's directory (and the idle vsock backend); Start then works."""
    pod_dir = env.daemon.state / "halfway"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        start = pool.submit(env.cri.run_pod, "halfway")
        deadline, spawned = time.monotonic() + 30, []
        while not spawned and time.monotonic() < deadline:
            time.sleep(0.01)
            spawned = _processes_naming(pod_dir)
        # asked again, the answer can be [] while setpriv execs virtiofsd (an exec's new memory
        # has no arguments yet): what was seen is the answer
        assert spawned, "QEMU or virtiofsd was spawned"
        _crash_daemon(env)
        with pytest.raises(grpc.RpcError):
            start.result()
    env.daemon.start()
    assert _gone(_processes_naming(pod_dir))
    # the Controller answers once the takeover is done (daemon.AfterRecovery), whose last step
    # stops the idle backend: asked before, the backend could still be there
    assert env.status("halfway").state == "SANDBOX_NOTREADY"
    assert not (env.daemon.state / "vsock-backend.json").exists()
    assert not TemplateStore(env.daemon.state).clone_ram_path("vmm-halfway").exists()  # [vm] template
    env.cri.controller.Start(sb.ControllerStartRequest(sandbox_id="halfway"), metadata=NS, timeout=120)
    assert env.status("halfway").state == "SANDBOX_READY"
    env.cri.remove_pod("halfway")
    assert _processes_naming(pod_dir) == [] and _state_left(env) == []
