"""ttrpc against Go's: our client (vmm_common/ttrpc) drives containerd's own runc shim
(containerd-shim-runc-v2, the upstream binary, a Go ttrpc server of containerd.task.v3.Task), and
the shim's Go events client publishes into our ttrpc server, as it publishes into containerd's.

The shim is launched as containerd 2.4 launches it (core/runtime/v2/binary.go, pkg/shim/util.go
Command at 301026e58c61): `containerd-shim-runc-v2 -namespace NS -address GRPC -publish-binary
CONTAINERD -id ID start` in the bundle directory, with the bootstrap protocol's
BootstrapParams on stdin and its BootstrapResult (version, protocol, address) on stdout, the
`log` FIFO in the bundle held open for reading. No containerd runs: the test is the shim's
containerd (the task calls, with the namespace in `containerd-namespace-ttrpc` metadata, and the
events server on its ttrpc address); runc is the upstream one, beside the shim.

What the agent's server would need to be dialled by containerd itself is in docs/claims.md
(ttrpc): containerd 2.4 dials a sandbox's task address only for version 3, the agent serves v2.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, empty_pb2, message_factory

import tools
from leak_guard import CONTAINER_CGROUP, fail_if_left, take_left_in
from vmm_common import ttrpc
from vmm_common.protos.containerd.events import task_pb2 as events_pb
from vmm_common.protos.containerd.runc.v1 import oci_pb2 as runc_options
from vmm_common.protos.containerd.services.ttrpc.events.v1 import events_pb2 as envelope_pb
from vmm_common.protos.containerd.task.v3 import shim_pb2 as task

NS = "interop"
TASK = "containerd.task.v3.Task"
EVENTS = "containerd.services.events.ttrpc.v1.Events"
NAMESPACE_METADATA = {"containerd-namespace-ttrpc": NS}  # pkg/namespaces/ttrpc.go TTRPCHeader
RUNNING, STOPPED = 2, 3  # containerd.v1.types.Status
OUTPUT = "hello from busybox under runc\n"


def _bootstrap_messages():
    """BootstrapParams and BootstrapResult (api/runtime/bootstrap/v1/bootstrap.proto, the
    fields used here), built from their field numbers: the guest image does not carry them."""
    proto = descriptor_pb2.FileDescriptorProto(name="interop_bootstrap.proto", syntax="proto3",
                                               package="containerd.runtime.bootstrap.v1")
    string, int32 = descriptor_pb2.FieldDescriptorProto.TYPE_STRING, descriptor_pb2.FieldDescriptorProto.TYPE_INT32
    for message, fields in (
            ("BootstrapParams", [("instance_id", 1, string), ("namespace", 2, string),
                                 ("containerd_version", 4, string), ("containerd_ttrpc_address", 5, string),
                                 ("containerd_grpc_address", 6, string), ("containerd_binary", 7, string),
                                 ("socket_dir", 9, string)]),
            ("BootstrapResult", [("version", 1, int32), ("address", 2, string), ("protocol", 3, string)])):
        described = proto.message_type.add(name=message)
        for name, number, kind in fields:
            described.field.add(name=name, number=number, type=kind,
                                label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return (message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{proto.package}.{name}"))
            for name in ("BootstrapParams", "BootstrapResult"))


BootstrapParams, BootstrapResult = _bootstrap_messages()


def _bundle(path: Path, cid: str) -> None:
    """runc's own default spec (`runc spec`) running busybox-static, in a cgroup the run's leak
    guard knows (tests/leak_guard.py CONTAINER_CGROUP)."""
    (path / "rootfs" / "bin").mkdir(parents=True)
    shutil.copy(tools.BUSYBOX, path / "rootfs" / "bin" / "busybox")
    subprocess.run([str(tools.upstream("runc")), "spec", "--bundle", str(path)], check=True)
    spec = json.loads((path / "config.json").read_text())
    spec["process"].update(terminal=False, args=["/bin/busybox", "sh", "-c",
                                                 f"printf '{OUTPUT}'; exec /bin/busybox sleep 600"])
    spec["linux"]["cgroupsPath"] = f"{CONTAINER_CGROUP}{cid}"
    (path / "config.json").write_text(json.dumps(spec))


class EventsServer:
    """containerd's ttrpc Events service, as far as a shim sees it: every Forward kept."""

    def __init__(self):
        self.envelopes: list = []
        self.server = ttrpc.Server()
        self.server.register(EVENTS, {"Forward": ttrpc.unary(envelope_pb.ForwardRequest, self._forward)})

    async def _forward(self, request, ctx):
        self.envelopes.append(request.envelope)
        return empty_pb2.Empty()

    async def published(self, topics: set[str], timeout: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not topics <= set(self.topics()) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)

    def topics(self) -> list[str]:
        return [envelope.topic for envelope in self.envelopes]

    def event(self, topic: str):
        """The one event published on `topic`, decoded with our protos."""
        found = [e for e in self.envelopes if e.topic == topic]
        assert len(found) == 1, f"{topic}: {len(found)} events in {self.topics()}"
        assert found[0].namespace == NS
        name = found[0].event.type_url.rsplit("/", 1)[-1]
        message = getattr(events_pb, name.rsplit(".", 1)[-1])()
        assert message.DESCRIPTOR.full_name == name, found[0].event.type_url
        message.ParseFromString(found[0].event.value)
        return message


async def _start_shim(bundle: Path, cid: str, sockets: Path, containerd_ttrpc: str) -> BootstrapResult:
    grpc_address = str(sockets / "containerd.sock")  # no containerd: only hashed into the shim's socket name
    params = BootstrapParams(instance_id=cid, namespace=NS, containerd_version="2.4.0-test",
                             containerd_ttrpc_address=containerd_ttrpc, containerd_grpc_address=grpc_address,
                             containerd_binary=str(tools.upstream("containerd")), socket_dir=str(sockets))
    env = dict(os.environ, PATH=f"{tools.upstream_bin_dir()}:{os.environ['PATH']}", GOMAXPROCS="2",
               MAX_SHIM_VERSION="2", TTRPC_ADDRESS=containerd_ttrpc, GRPC_ADDRESS=grpc_address, NAMESPACE=NS)
    proc = await asyncio.create_subprocess_exec(
        str(tools.upstream("containerd-shim-runc-v2")), "-namespace", NS, "-address", grpc_address,
        "-publish-binary", str(tools.upstream("containerd")), "-id", cid, "start",
        cwd=bundle, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(params.SerializeToString()), 30)
    assert proc.returncode == 0, f"shim start: {err.decode(errors='replace')}"
    return BootstrapResult.FromString(out)


async def _shim_session(bundle: Path, cid: str, sockets: Path, events: EventsServer) -> dict:
    """Start the shim, run the container through it with our client, shut it down; what was seen."""
    listener = _listener(sockets / "containerd.sock.ttrpc")
    serving = asyncio.ensure_future(events.server.serve(listener))
    seen = {}
    try:
        result = await _start_shim(bundle, cid, sockets, f"{sockets}/containerd.sock.ttrpc")
        seen["bootstrap"] = (result.version, result.protocol, result.address)
        client = await ttrpc.Client.connect_unix(result.address.removeprefix("unix://"))

        async def call(method, request, response_type=empty_pb2.Empty):
            return await client.call(TASK, method, request, response_type, timeout=30, metadata=NAMESPACE_METADATA)

        try:
            seen["connect"] = await call("Connect", task.ConnectRequest(id=cid), task.ConnectResponse)
            options = runc_options.Options(root=str(bundle.parent / "runc-root"))
            # both, as `ctr --log-uri file://` sends them: with stdout alone the shim dereferences a nil stderr pipe
            create = task.CreateTaskRequest(id=cid, bundle=str(bundle), stdout=f"file://{bundle}/output",
                                            stderr=f"file://{bundle}/output")
            create.options.Pack(options)
            seen["create"] = await call("Create", create, task.CreateTaskResponse)
            seen["start"] = await call("Start", task.StartRequest(id=cid), task.StartResponse)
            seen["running"] = await call("State", task.StateRequest(id=cid), task.StateResponse)
            seen["pids"] = await call("Pids", task.PidsRequest(id=cid), task.PidsResponse)
            try:
                seen["unknown"] = await call("State", task.StateRequest(id="no-such-task"), task.StateResponse)
            except ttrpc.RpcError as e:
                seen["unknown"] = (e.code, e.message)
            seen["output"] = await _contents(bundle / "output", len(OUTPUT))  # before the kill cuts it short
            wait = asyncio.ensure_future(call("Wait", task.WaitRequest(id=cid), task.WaitResponse))
            await call("Kill", task.KillRequest(id=cid, signal=signal.SIGKILL))
            seen["wait"] = await wait
            seen["stopped"] = await call("State", task.StateRequest(id=cid), task.StateResponse)
            seen["delete"] = await call("Delete", task.DeleteRequest(id=cid), task.DeleteResponse)
            # forwarded apart from the answers, and lost if the shim ends first: awaited before Shutdown
            await events.published({"/tasks/exit", "/tasks/delete"})
            await call("Shutdown", task.ShutdownRequest(id=cid))
        finally:
            await client.close()
        seen["shim_ended"] = await _ended(seen["connect"].shim_pid)
    finally:
        serving.cancel()
        listener.close()
    return seen


def _listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(16)
    return sock


async def _contents(path: Path, size: int, timeout: float = 10.0) -> str:
    """The file once it holds `size` bytes (the shim copies the container's output to it)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while path.stat().st_size < size and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    return path.read_text()


async def _ended(pid: int, timeout: float = 10.0) -> bool:
    """Whether `pid` exits (or is a zombie: the shim daemon's parent is whoever adopted it)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.fixture
def upstream_shim():
    """Skips naming what is missing: the shim, runc and containerd (only its path is passed)."""
    absent = [str(tools.upstream(name)) for name in ("containerd-shim-runc-v2", "runc", "containerd")
              if not os.access(tools.upstream(name), os.X_OK)]
    absent += [f"{tools.BUSYBOX} (busybox-static)"] if not tools.BUSYBOX.is_file() else []
    if absent:
        pytest.skip(f"missing {', '.join(absent)}; set {tools.BIN_VARIABLE} to ../shared/containerd/bin")


def test_our_client_drives_containerd_shim_runc_v2_and_its_events_reach_our_server(tmp_path, upstream_shim):
    cid = f"interop-{os.urandom(4).hex()}"
    bundle = tmp_path / "bundles" / cid
    bundle.mkdir(parents=True)
    _bundle(bundle, cid)
    os.mkfifo(bundle / "log")  # containerd's openShimLog: the shim opens it for writing, blocking
    shim_log = os.open(bundle / "log", os.O_RDONLY | os.O_NONBLOCK)
    sockets = Path(tempfile.mkdtemp(prefix="shim-"))  # short: unix socket paths
    events = EventsServer()
    try:
        seen = asyncio.run(asyncio.wait_for(_shim_session(bundle, cid, sockets, events), 120))
    finally:
        try:
            log = os.read(shim_log, 1 << 20).decode(errors="replace")
        except BlockingIOError:
            log = ""
        os.close(shim_log)
        print(f"the shim's log (its `log` FIFO):\n{log}")  # shown by pytest if the test fails
        shutil.rmtree(sockets, ignore_errors=True)
        left = take_left_in(tmp_path, cgroup=f"{CONTAINER_CGROUP}{cid}")
    fail_if_left(left)

    version, protocol, address = seen["bootstrap"]
    assert (version, protocol) == (3, "ttrpc") and address.startswith(f"unix://{sockets}/"), seen["bootstrap"]
    pid = seen["create"].pid
    assert pid > 0 and seen["start"].pid == pid, log
    running = seen["running"]
    assert (running.id, running.pid, running.status, running.bundle) == (cid, pid, RUNNING, str(bundle))
    assert [p.pid for p in seen["pids"].processes] == [pid]
    assert seen["unknown"][0] == ttrpc.Code.NOT_FOUND, seen["unknown"]
    assert seen["wait"].exit_status == 128 + signal.SIGKILL and seen["wait"].exited_at.seconds > 0
    stopped = seen["stopped"]
    assert (stopped.status, stopped.exit_status) == (STOPPED, 128 + signal.SIGKILL)
    assert (seen["delete"].pid, seen["delete"].exit_status) == (pid, 128 + signal.SIGKILL)
    assert seen["shim_ended"], "the shim did not exit after Shutdown"
    assert seen["output"] == OUTPUT

    assert events.topics()[:2] == ["/tasks/create", "/tasks/start"], events.topics()
    assert {"/tasks/exit", "/tasks/delete"} <= set(events.topics()), events.topics()
    created = events.event("/tasks/create")
    assert (created.container_id, created.bundle, created.pid) == (cid, str(bundle), pid)
    assert events.event("/tasks/start").pid == pid
    exited = events.event("/tasks/exit")
    assert (exited.container_id, exited.pid, exited.exit_status) == (cid, pid, 128 + signal.SIGKILL)
    assert events.event("/tasks/delete").exit_status == 128 + signal.SIGKILL
