"""vmm-sandboxer end to end: a gRPC client from the generated stubs does what containerd's CRI
does (and a ttrpc client what it does at the task address), against the real daemon, real QEMU
(TCG) VMs, real crun (and runc) in the guest.

containerd's Events service is stood in for by a gRPC server from the generated stubs, so that
every published event can be checked; the real containerd 2.4 (../shared/containerd/bin) drives
the daemon in tests/e2e. Everything else is real.
"""

import collections
import concurrent.futures
import importlib.util
import json
import os
import queue
import shutil
import signal
import tempfile
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2, empty_pb2

from daemon_harness import exists_for_the_guest
from leak_guard import fail_if_left, mounts_left, stop_daemon
from tests.unit.test_agent_podconfig import cri_userns_config
from tests.unit.test_sandboxer_status_info import check_cri_info, crictl_reads
from vmm_common.protos.containerd.events import task_pb2 as events
from vmm_common.protos.containerd.services.events.v1 import events_pb2_grpc
from vmm_common.protos.containerd.services.sandbox.v1 import sandbox_pb2 as sb
from vmm_common.protos.containerd.task.v3 import shim_pb2 as task
from vmm_common import ttrpc

_spec = importlib.util.spec_from_file_location("demo", Path(__file__).resolve().parents[2] / "scripts" / "demo.py")
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)
NS = demo.NAMESPACE

pytestmark = [pytest.mark.vm, pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")]


class Events(events_pb2_grpc.EventsServicer):
    """containerd's Events service: what the daemon publishes, as a queue the test reads and as
    the whole stream (`repeats()`, checked after every test)."""

    def __init__(self):
        self.received = queue.Queue()
        self.stream: list[tuple] = []

    def Publish(self, request, context):
        event = (dict(context.invocation_metadata()).get("containerd-namespace"), request.topic, request.event)
        self.received.put(event)
        self.stream.append(event)
        return empty_pb2.Empty()

    def repeats(self) -> list[str]:
        """Events published more than once (same namespace, topic and payload) over the whole
        stream. /tasks/oom is left out: a second OOM of a container is the same bytes."""
        counts = collections.Counter((ns, topic, event.type_url, event.value) for ns, topic, event in self.stream
                                     if topic != "/tasks/oom")
        return [f"{topic} x{n}: {value[:120]!r}" for (_, topic, _, value), n in counts.items() if n > 1]

    def topics(self, want: set, timeout: float = 20.0) -> list:
        """Events received until every topic in `want` was seen (or the timeout)."""
        seen, deadline = [], time.monotonic() + timeout
        while not want <= {t for _, t, _ in seen} and time.monotonic() < deadline:
            try:
                seen.append(self.received.get(timeout=0.2))
            except queue.Empty:
                pass
        return seen


class Env:
    def __init__(self, work: Path, image, sharefs: str = "virtiofs", settings: dict[str, str] | None = None):
        """`settings`: daemon config lines to add, by section (e.g. {"vm": "max_cpus = 2"})."""
        self.work = work
        self.image = image
        self.events = Events()
        self.events_server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
        events_pb2_grpc.add_EventsServicer_to_server(self.events, self.events_server)
        sock = work / "containerd.sock"
        self.events_server.add_insecure_port(f"unix://{sock}")
        self.events_server.start()
        self.daemon = demo.Daemon(work, image.kernel, image.initrd, containerd_address=str(sock))
        config = self.daemon.config.read_text() + f'[sharefs]\ntype = "{sharefs}"\n'
        for section, lines in (settings or {}).items():
            config = config.replace(f"[{section}]\n", f"[{section}]\n{lines}\n", 1)
        self.daemon.config.write_text(config)
        try:
            self.daemon.start()
        except BaseException:
            self.daemon.stop()  # one that did not listen in time may still run
            self.events_server.stop(None)
            raise
        self.cri = demo.Cri(self.daemon.socket)
        self.lower = demo.busybox_tree()

    def bundle(self, cid: str, args: list[str], sandbox_pid: int, terminal=False) -> "demo.Bundle":
        return demo.Bundle(self.work / "bundles", cid, demo.cri_spec(args, cid, sandbox_pid, terminal), self.lower)

    def status(self, sandbox_id: str, verbose=False):
        return self.cri.controller.Status(sb.ControllerStatusRequest(sandbox_id=sandbox_id, verbose=verbose),
                                          metadata=NS, timeout=10)


@pytest.fixture
def env(guest_image, request):
    """Parametrize indirectly with the share fs type, or with Env's keyword arguments (a dict),
    or "runc": the guest image with runc in place of crun (`make guest-image-runc`). After the
    test: nothing left (leak_guard) and no event published twice over the whole stream."""
    param = getattr(request, "param", "virtiofs")
    image = request.getfixturevalue("runc_guest_image") if param == "runc" else guest_image  # may skip
    work = Path(tempfile.mkdtemp(prefix="vsb-"))  # short: unix socket paths; after any skip
    try:
        if param == "runc":
            e = Env(work, image)
        else:
            e = Env(work, image, **(param if isinstance(param, dict) else {"sharefs": param}))
    except BaseException:  # a daemon that did not start left only its files: not the next test's leak
        shutil.rmtree(work, ignore_errors=True)
        raise
    yield e
    left = stop_daemon(e.daemon, work)  # pods outlive the daemon: what the test did not remove
    e.events_server.stop(None)
    shutil.rmtree(work, ignore_errors=True)
    fail_if_left(left)
    assert not e.events.repeats(), f"published more than once: {e.events.repeats()}"


def code_of(call) -> grpc.StatusCode | ttrpc.Code:
    """The status code of a failed Controller (gRPC) or task API (ttrpc) call."""
    with pytest.raises((grpc.RpcError, ttrpc.RpcError)) as info:
        call()
    return info.value.code() if isinstance(info.value, grpc.RpcError) else info.value.code


@pytest.mark.parametrize("env", ["virtiofs", "runc"], indirect=True)
def test_cri_pod_lifecycle_exec_tty_events_and_bad_requests(env):
    """With the default image (crun) and with the runc one: every container call below goes
    through the guest's runtime."""
    manifest = json.loads(env.image.manifest.read_text())
    started = env.cri.run_pod("pod1")
    assert started.version == 3
    assert started.address == f"ttrpc+unix://{env.daemon.state}/pod1/task.sock"
    assert os.path.exists(f"/proc/{started.pid}")
    assert env.status("pod1").state == "SANDBOX_READY"
    tasks = demo.Cri.task_client(started.address)

    b = env.bundle("c1", ["sh", "-c", "uname -r; cat /etc/hostname; echo oops >&2; exit 3"], started.pid)
    # containerd 2.4's spec version: the guest's crun (Debian 13) must take it, Debian 12's refuses it
    assert json.loads((b.path / "config.json").read_text())["ociVersion"] == "1.3.0"
    out, err, status = demo.run_container(tasks, b)
    release = manifest["kernel"]["release"]
    assert release != os.uname().release, "the container must run on the guest kernel"
    assert out == f"{release}\nc1\n".encode()  # and the host bind mount reached the guest
    assert (err, status) == (b"oops\n", 3)
    seen = env.events.topics({"/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"})
    assert {"/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"} <= {t for _, t, _ in seen}
    assert {ns for ns, _, _ in seen} == {"k8s.io"}
    exit_event = next(events.TaskExit.FromString(e.value) for _, t, e in seen if t == "/tasks/exit")
    assert (exit_event.container_id, exit_event.exit_status) == ("c1", 3)
    # Task.Shutdown came after Delete (as containerd does): the pod must still be up.
    assert env.status("pod1").state == "SANDBOX_READY"
    assert not exists_for_the_guest(env.daemon.state, env.daemon.state / "pod1" / "shared" / "c1")

    # exec with a TTY into a running container
    b2 = env.bundle("c2", ["sleep", "300"], started.pid)
    tasks.Create(task.CreateTaskRequest(id="c2", bundle=str(b2.path), rootfs=b2.rootfs), metadata=NS, timeout=60)
    tasks.Start(task.StartRequest(id="c2"), metadata=NS, timeout=60)
    tty_out = b2.fifo("exec-out")
    reader = demo.FifoReader(tty_out)
    process = {"terminal": True, "args": ["sh", "-c", "tty; sleep 2; stty size; echo exec-ok"], "cwd": "/",
               "env": ["PATH=/bin", "TERM=xterm"], "user": {"uid": 0, "gid": 0}}
    spec = task.ExecProcessRequest(id="c2", exec_id="e1", terminal=True, stdout=tty_out)
    spec.spec.type_url = demo.PROCESS_SPEC_TYPE
    spec.spec.value = json.dumps(process).encode()
    tasks.Exec(spec, metadata=NS, timeout=60)
    tasks.Start(task.StartRequest(id="c2", exec_id="e1"), metadata=NS, timeout=60)
    tasks.ResizePty(task.ResizePtyRequest(id="c2", exec_id="e1", width=100, height=40), metadata=NS, timeout=10)
    assert tasks.Wait(task.WaitRequest(id="c2", exec_id="e1"), metadata=NS, timeout=60).exit_status == 0
    assert reader.result() == b"/dev/pts/0\r\n40 100\r\nexec-ok\r\n"

    # stdin: containerd writes its FIFO, closes it, then CloseIO; everything reaches the process
    stdin, stdout = b2.fifo("cat-in"), b2.fifo("cat-out")
    cat_out = demo.FifoReader(stdout)
    cat = task.ExecProcessRequest(id="c2", exec_id="e2", stdin=stdin, stdout=stdout)
    cat.spec.type_url = demo.PROCESS_SPEC_TYPE
    cat.spec.value = json.dumps(dict(process, terminal=False, args=["cat"])).encode()
    tasks.Exec(cat, metadata=NS, timeout=60)
    tasks.Start(task.StartRequest(id="c2", exec_id="e2"), metadata=NS, timeout=60)
    payload = os.urandom(200_000)
    with open(stdin, "wb") as f:
        f.write(payload)
    tasks.CloseIO(task.CloseIORequest(id="c2", exec_id="e2", stdin=True), metadata=NS, timeout=60)
    assert tasks.Wait(task.WaitRequest(id="c2", exec_id="e2"), metadata=NS, timeout=60).exit_status == 0
    assert cat_out.result() == payload
    state = tasks.State(task.StateRequest(id="c2"), metadata=NS, timeout=10)
    assert state.bundle == str(b2.path)  # host paths back, not the guest's
    # plain forwarding: Pids, Stats, Pause/Resume
    assert state.pid in [p.pid for p in tasks.Pids(task.PidsRequest(id="c2"), metadata=NS, timeout=10).processes]
    assert tasks.Stats(task.StatsRequest(id="c2"), metadata=NS, timeout=10).stats.type_url
    tasks.Pause(task.PauseRequest(id="c2"), metadata=NS, timeout=10)
    assert tasks.State(task.StateRequest(id="c2"), metadata=NS, timeout=10).status == 4  # PAUSED
    tasks.Resume(task.ResumeRequest(id="c2"), metadata=NS, timeout=10)
    assert tasks.State(task.StateRequest(id="c2"), metadata=NS, timeout=10).status == 2  # RUNNING
    tasks.Kill(task.KillRequest(id="c2", signal=signal.SIGKILL, all=True), metadata=NS, timeout=10)
    assert tasks.Wait(task.WaitRequest(id="c2"), metadata=NS, timeout=60).exit_status == 137
    tasks.Delete(task.DeleteRequest(id="c2"), metadata=NS, timeout=60)

    # bad requests get clear codes
    ctl, codes = env.cri.controller, grpc.StatusCode
    assert code_of(lambda: ctl.Start(sb.ControllerStartRequest(sandbox_id="nope"), timeout=10)) == codes.NOT_FOUND
    assert code_of(lambda: ctl.Create(sb.ControllerCreateRequest(sandbox_id="pod1"), timeout=10)) \
        == codes.ALREADY_EXISTS
    assert code_of(lambda: ctl.Create(sb.ControllerCreateRequest(sandbox_id="../x"), timeout=10)) \
        == codes.INVALID_ARGUMENT
    missing = task.CreateTaskRequest(id="c3", bundle=str(env.work / "no-such-bundle"))
    assert code_of(lambda: tasks.Create(missing, timeout=10)) == ttrpc.Code.NOT_FOUND
    assert code_of(lambda: tasks.State(task.StateRequest(id="ghost"), timeout=10)) == ttrpc.Code.NOT_FOUND
    b3 = env.bundle("c3", ["true"], started.pid)
    spec3 = json.loads((b3.path / "config.json").read_text())
    spec3["mounts"].append({"destination": "/data", "type": "bind", "source": "/no/such/volume",
                            "options": ["rbind"]})
    (b3.path / "config.json").write_text(json.dumps(spec3))
    with pytest.raises(ttrpc.RpcError) as missing_volume:
        tasks.Create(task.CreateTaskRequest(id="c3", bundle=str(b3.path), rootfs=b3.rootfs), timeout=30)
    assert missing_volume.value.code == ttrpc.Code.NOT_FOUND
    assert "/no/such/volume" in missing_volume.value.message
    assert not exists_for_the_guest(env.daemon.state, env.daemon.state / "pod1" / "mounts" / "c3")  # nothing left
    assert code_of(lambda: tasks.Create(task.CreateTaskRequest(id="a/b", bundle=str(b2.path)), timeout=10)) \
        == ttrpc.Code.INVALID_ARGUMENT

    metrics = ctl.Metrics(sb.ControllerMetricsRequest(sandbox_id="pod1"), timeout=10).metrics
    assert metrics.id == "pod1" and metrics.data.type_url == "io.containerd.cgroups.v2.Metrics"
    info = dict(env.status("pod1", verbose=True).info)
    assert crictl_reads(info)["boot_agent_reported"]["pid"] == 1  # JSON, as crictl inspectp reads it
    assert check_cri_info(info)["processStatus"] == "running"

    env.cri.remove_pod("pod1")
    assert code_of(lambda: env.status("pod1")) == grpc.StatusCode.NOT_FOUND
    assert not (env.daemon.state / "pod1").exists()
    assert mounts_left(env.work) == []


def test_five_pods_at_once(env):
    ids = [f"p{i}" for i in range(5)]
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        started = dict(zip(ids, pool.map(env.cri.run_pod, ids)))

        def run(sid):
            b = env.bundle(f"{sid}-c", ["cat", "/etc/hostname"], started[sid].pid)
            return demo.run_container(demo.Cri.task_client(started[sid].address), b)

        results = dict(zip(ids, pool.map(run, ids)))
    assert len({s.pid for s in started.values()}) == 5
    for sid in ids:
        assert results[sid] == (f"{sid}-c\n".encode(), b"", 0)
    for sid in ids:
        env.cri.remove_pod(sid)
    assert mounts_left(env.work) == []


def _long_running_pod(env, sid):
    started = env.cri.run_pod(sid)
    tasks = demo.Cri.task_client(started.address)
    b = env.bundle(f"{sid}-c", ["sleep", "1000"], started.pid)
    tasks.Create(task.CreateTaskRequest(id=b.id, bundle=str(b.path), rootfs=b.rootfs), metadata=NS, timeout=60)
    tasks.Start(task.StartRequest(id=b.id), metadata=NS, timeout=60)
    return started, tasks, b


def test_vmm_killed(env):
    started, tasks, b = _long_running_pod(env, "crash")
    _long_running_pod(env, "bystander")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        task_wait = pool.submit(tasks.Wait, task.WaitRequest(id=b.id), metadata=NS, timeout=60)
        pod_wait = pool.submit(env.cri.controller.Wait, sb.ControllerWaitRequest(sandbox_id="crash"),
                               metadata=NS, timeout=60)
        time.sleep(0.5)
        os.kill(started.pid, signal.SIGKILL)
        assert task_wait.result().exit_status == 255
        assert pod_wait.result().exit_status == 128 + signal.SIGKILL
    assert env.status("crash").state == "SANDBOX_NOTREADY"
    # what CRI does next (crictl rm): State, then Delete, answered without the VM
    state = tasks.State(task.StateRequest(id=b.id), metadata=NS, timeout=10)
    assert (state.status, state.exit_status, state.bundle) == (3, 255, str(b.path))  # STOPPED
    # CRI's stop path Kills what it still thinks runs: NOT_FOUND, which it ignores, as for runc
    kill = task.KillRequest(id=b.id, signal=signal.SIGKILL, all=True)
    assert code_of(lambda: tasks.Kill(kill, metadata=NS, timeout=10)) == ttrpc.Code.NOT_FOUND
    assert tasks.Delete(task.DeleteRequest(id=b.id), metadata=NS, timeout=10).exit_status == 255
    assert not exists_for_the_guest(env.daemon.state, env.daemon.state / "crash" / "mounts" / b.id)
    assert env.status("bystander").state == "SANDBOX_READY"
    exits = env.events.topics({"/tasks/exit"})
    assert any(t == "/tasks/exit" and events.TaskExit.FromString(e.value).container_id == b.id
               for _, t, e in exits)
    env.cri.controller.Shutdown(sb.ControllerShutdownRequest(sandbox_id="crash"), metadata=NS, timeout=60)
    assert not (env.daemon.state / "crash").exists()
    assert all("/bystander/" in p for p in mounts_left(env.daemon.state))
    env.cri.remove_pod("bystander")  # Stop with a container still running, then Shutdown
    assert mounts_left(env.work) == []


@pytest.mark.parametrize("env", ["9p"], indirect=True)
def test_rootfs_and_binds_over_9p(env):
    started = env.cri.run_pod("ninep")
    b = env.bundle("c9", ["sh", "-c", "cat /etc/hostname; ls /bin/busybox"], started.pid)
    out = demo.run_container(demo.Cri.task_client(started.address), b)
    assert out == (b"c9\n/bin/busybox\n", b"", 0)
    env.cri.remove_pod("ninep")
    assert mounts_left(env.work) == []


def test_create_refuses_a_user_namespace_a_runc_pod_refuses(env):
    """critest's "runtime should fail with NamespaceMode_CONTAINER": the daemon refuses the pod's
    config at Create (vmm_common/userns.py, the agent's rules), before a VM or state exists."""
    options = any_pb2.Any(type_url="type.googleapis.com/runtime.v1.PodSandboxConfig",
                          value=cri_userns_config(1, [], []))
    with pytest.raises(grpc.RpcError) as refused:
        env.cri.controller.Create(sb.ControllerCreateRequest(sandbox_id="userns", options=options),
                                  metadata=NS, timeout=10)
    assert (refused.value.code(), refused.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, (
        'sandbox userns: user namespace configuration: unsupported user namespace mode: "CONTAINER"'))
    assert not (env.daemon.state / "userns").exists()
    assert code_of(lambda: env.status("userns")) == grpc.StatusCode.NOT_FOUND


def test_start_failure_carries_the_console_tail(env):
    """A guest that cannot run its agent: Start fails in bounded time quoting the console.
    (rdinit= for an initrd, init= for the pmem root: the last init= on the command line wins.)"""
    env.daemon.stop()
    env.daemon.config.write_text(env.daemon.config.read_text().replace(
        "[vm]\n", '[vm]\nkernel_params = "rdinit=/no-such-init init=/no-such-init"\n', 1))
    env.daemon.start()
    ctl = env.cri.controller
    ctl.Create(sb.ControllerCreateRequest(sandbox_id="broken"), metadata=NS, timeout=10)
    with pytest.raises(grpc.RpcError) as failure:
        ctl.Start(sb.ControllerStartRequest(sandbox_id="broken"), metadata=NS, timeout=90)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "console tail" in failure.value.details() and "Kernel panic" in failure.value.details()
    assert mounts_left(env.work) == [] and not (env.daemon.state / "broken").exists()
