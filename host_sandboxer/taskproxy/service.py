"""containerd.task.v3.Task for one pod, forwarded to the guest's containerd.task.v2.Task.

v2 and v3 messages have the same fields, so most calls are re-encoded and forwarded. What
only the host can see is translated first: Create/Exec (bundle, rootfs, binds, stdio FIFOs),
State (guest stdio/bundle back to the host's), Delete (host mounts and relays undone),
CloseIO (stdin drained before the guest closes it), Wait (VM death ends it with 255), and
Shutdown, which containerd sends after every container's Delete: it must not stop the pod.

Served over ttrpc (`task_service`), on the connections the node's task relay carries
(host_sandboxer/taskrelay/): failures become ttrpc statuses with the codes and messages
containerd would get from a shim. A restarted daemon answers a pod's calls once it has taken
the pod over (`pod.recovery`), so a call replayed by the relay meets the pod as it really is.
"""

import asyncio
import logging
import time

import grpc
from google.protobuf import empty_pb2, message_factory

from host_sandboxer.taskproxy.bundle import GuestBundle
from host_sandboxer.taskproxy.errors import HostError
from host_sandboxer.taskproxy.spec_rewrite import guest_bundle
from host_sandboxer.taskproxy import streaming
from host_sandboxer.taskproxy.stdio import ProcessStdio
from host_sandboxer.sandbox.ids import InvalidID, check_id
from host_sandboxer.sandbox.pod import UNKNOWN_EXIT_STATUS, timestamp
from vmm_common.protos.containerd.task.v2 import shim_pb2 as v2
from vmm_common.protos.containerd.task.v3 import shim_pb2 as v3
from vmm_common.protos.containerd.types.task import task_pb2 as task_types
from vmm_common import ttrpc
from vmm_common.ttrpc import Code, RpcError

log = logging.getLogger(__name__)

GUEST_TASK_SERVICE = "containerd.task.v2.Task"
TASK_SERVICE = "containerd.task.v3.Task"
HELD_CALLS = frozenset({"Wait", "Stream"})  # held open for a process's life: a leaving daemon does not await them
STDIO_DRAIN_S = 5.0
LINK_LOST_GRACE_S = 3.0  # how long a lost guest link may precede the VMM's noticed death
_V2_METHODS = v2.DESCRIPTOR.services_by_name["Task"].methods_by_name
_V3_METHODS = v3.DESCRIPTOR.services_by_name["Task"].methods_by_name


def _v2_types(method: str):
    m = _V2_METHODS[method]
    return (message_factory.GetMessageClass(m.input_type),
            message_factory.GetMessageClass(m.output_type))


def task_service(pod) -> ttrpc.Server:
    """containerd.task.v3.Task of `pod`: TaskProxy's handlers, each waiting for the pod's
    takeover by a restarted daemon first. Methods TaskProxy lacks answer UNIMPLEMENTED. Next to
    it containerd's Streaming service, for runtimes with `io_type = "streaming"`."""
    proxy = TaskProxy(pod)

    def after_recovery(handler):
        async def call(request, context):
            await asyncio.shield(pod.recovery)
            return await handler(request, context)
        return call

    server = ttrpc.Server()
    server.register(TASK_SERVICE, {
        name: ttrpc.unary(message_factory.GetMessageClass(method.input_type),
                          after_recovery(getattr(proxy, name)))
        for name, method in _V3_METHODS.items() if hasattr(proxy, name)})
    streaming.register(server, pod.streams)
    return server


class TaskProxy:
    """One pod's Task API. `pod` supplies the guest link and the pod's host-side state."""

    def __init__(self, pod):
        self.pod = pod

    # -- plumbing ---------------------------------------------------------------------------

    async def _guest(self, method: str, request, v3_response, timeout: float | None = 30.0):
        """Re-encode `request` as v2, call the guest, re-encode the reply as `v3_response`."""
        req_type, resp_type = _v2_types(method)
        reply = await self.pod.agent_call(GUEST_TASK_SERVICE, method,
                                          req_type.FromString(request.SerializeToString()),
                                          resp_type, timeout=timeout)
        return v3_response.FromString(reply.SerializeToString())

    async def _run(self, what: str, coro):
        """Await `coro`, turning host and guest failures into the call's status naming `what`."""
        try:
            return await coro
        except HostError as exc:
            raise RpcError(exc.code.value[0], exc.message) from None
        except InvalidID as exc:
            raise RpcError(Code.INVALID_ARGUMENT, str(exc)) from None
        except RpcError as exc:
            raise RpcError(exc.code, f"{what}: {exc.message}") from None
        except (ConnectionError, EOFError, OSError) as exc:
            raise RpcError(Code.UNAVAILABLE, f"{what}: pod {self.pod.id}: guest unreachable: {exc}") from None

    def _forwarder(method: str, v3_response):
        async def handler(self, request, context):
            what = f"{method} {getattr(request, 'id', '')}".strip()
            return await self._run(what, self._guest(method, request, v3_response))
        handler.__name__ = method
        handler.__doc__ = f"Forwarded to the guest's {GUEST_TASK_SERVICE}/{method}."
        return handler

    Start = _forwarder("Start", v3.StartResponse)
    Pids = _forwarder("Pids", v3.PidsResponse)
    Pause = _forwarder("Pause", empty_pb2.Empty)
    Resume = _forwarder("Resume", empty_pb2.Empty)
    Checkpoint = _forwarder("Checkpoint", empty_pb2.Empty)
    ResizePty = _forwarder("ResizePty", empty_pb2.Empty)
    Update = _forwarder("Update", empty_pb2.Empty)
    Stats = _forwarder("Stats", v3.StatsResponse)
    del _forwarder

    # -- translated calls ---------------------------------------------------------------------

    async def Create(self, request, context):
        return await self._run(f"Create {request.id}", self._create(request))

    async def _create(self, request):
        cid = check_id("container", request.id)
        if cid in self.pod.containers:
            raise HostError(grpc.StatusCode.ALREADY_EXISTS,
                            f"container {cid} already exists in pod {self.pod.id}")
        stdio = ProcessStdio.create(request.stdin, request.stdout, request.stderr, self.pod.ports,
                                    self.pod.stdio_dir, request.terminal)  # FIFOs checked first
        bundle = GuestBundle(self.pod.mounts_dir, cid)
        bundle.prepare(request.bundle, request.rootfs, self.pod.pod_namespaces())
        self.pod.add_container(cid, request.bundle, stdio)
        guest_request = v3.CreateTaskRequest()
        guest_request.CopyFrom(request)
        guest_request.bundle = guest_bundle(cid)
        del guest_request.rootfs[:]
        for name, path in stdio.guest_paths().items():
            setattr(guest_request, name, path)
        try:
            reply = await self._guest("Create", guest_request, v3.CreateTaskResponse, timeout=60)
        except BaseException:
            await self.pod.remove_container(cid)
            raise
        stdio.start(self.pod.transport, self.pod.streams)  # the agent listens on the stdio ports from now on
        return reply

    async def Exec(self, request, context):
        return await self._run(f"Exec {request.id}/{request.exec_id}", self._exec(request))

    async def _exec(self, request):
        container = self.pod.container(request.id)
        check_id("exec", request.exec_id)
        if request.exec_id in container.processes:
            raise HostError(grpc.StatusCode.ALREADY_EXISTS,
                            f"exec {request.exec_id} already exists in {request.id}")
        stdio = ProcessStdio.create(request.stdin, request.stdout, request.stderr, self.pod.ports,
                                    self.pod.stdio_dir, request.terminal)
        guest_request = v3.ExecProcessRequest()
        guest_request.CopyFrom(request)
        for name, path in stdio.guest_paths().items():
            setattr(guest_request, name, path)
        self.pod.add_process(container, request.exec_id, stdio)
        try:
            reply = await self._guest("Exec", guest_request, empty_pb2.Empty)
        except BaseException:
            await self.pod.remove_process(container, request.exec_id)
            raise
        stdio.start(self.pod.transport, self.pod.streams)
        return reply

    async def Kill(self, request, context):
        return await self._run(f"Kill {request.id}", self._kill(request))

    async def _kill(self, request):
        """With the VM gone its processes are too (State says stopped): NOT_FOUND, the runc
        shim's answer for a finished process, which containerd's stop path ignores."""
        self.pod.container(request.id)
        if self.pod.vm_exited.done():
            raise HostError(grpc.StatusCode.NOT_FOUND,
                            f"process already finished: pod {self.pod.id}'s VM is gone")
        return await self._guest("Kill", request, empty_pb2.Empty)

    async def State(self, request, context):
        return await self._run(f"State {request.id}", self._state(request))

    async def _state(self, request):
        container = self.pod.container(request.id)
        if self.pod.vm_exited.done():  # what containerd's shim says of a process that died
            stamp = timestamp(self.pod.exited_at_ns)
            reply = v3.StateResponse(id=request.id, exec_id=request.exec_id, status=task_types.STOPPED,
                                     exit_status=UNKNOWN_EXIT_STATUS, exited_at=stamp)
        else:
            reply = await self._guest("State", request, v3.StateResponse)
        stdio = container.processes.get(request.exec_id)
        reply.bundle = container.host_bundle
        if stdio is not None:
            reply.stdin, reply.stdout, reply.stderr = (stdio.fifos[n] for n in ("stdin", "stdout", "stderr"))
        return reply

    async def Wait(self, request, context):
        return await self._run(f"Wait {request.id}", self._wait(request))

    async def _wait(self, request):
        container = self.pod.container(request.id)
        reply = await self._guest_wait(request)
        if reply is None:
            return vm_death_exit(self.pod)
        stdio = container.processes.get(request.exec_id)
        if stdio is not None:
            await stdio.outputs_done(STDIO_DRAIN_S)
        return reply

    async def _guest_wait(self, request):
        """The guest's Wait answer, or None when the VM died first. A link lost while the VM
        lives (the VMM's death is noticed a moment after its sockets close) is waited on again."""
        while not self.pod.vm_exited.done():
            call = asyncio.ensure_future(self._guest("Wait", request, v3.WaitResponse, timeout=None))
            try:
                await asyncio.wait({call, self.pod.vm_exited}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not call.done():  # the VM died, or containerd gave up waiting
                    call.cancel()
            if not call.done() or call.cancelled():
                return None
            try:
                return call.result()
            except ConnectionError:
                try:
                    await asyncio.wait_for(asyncio.shield(self.pod.vm_exited), LINK_LOST_GRACE_S)
                    return None
                except asyncio.TimeoutError:
                    log.warning("pod %s: link lost during Wait %s with the VM alive; waiting again",
                                self.pod.id, request.id)
        return None

    async def CloseIO(self, request, context):
        return await self._run(f"CloseIO {request.id}", self._close_io(request))

    async def _close_io(self, request):
        stdio = self.pod.container(request.id).processes.get(request.exec_id)
        if request.stdin and stdio is not None:
            # containerd closed its end of the stdin FIFO; let the relay carry the rest first.
            await stdio.stdin_done(STDIO_DRAIN_S)
        return await self._guest("CloseIO", request, empty_pb2.Empty)

    async def Delete(self, request, context):
        return await self._run(f"Delete {request.id}", self._delete(request))

    async def _delete(self, request):
        container = self.pod.container(request.id)
        if self.pod.vm_exited.done():  # the VM took the process with it: only the host side is left
            reply = v3.DeleteResponse(exit_status=UNKNOWN_EXIT_STATUS,
                                      exited_at=timestamp(self.pod.exited_at_ns))
        else:
            reply = await self._guest("Delete", request, v3.DeleteResponse)
        if request.exec_id:
            await self.pod.remove_process(container, request.exec_id)
        else:
            await self.pod.remove_container(request.id)
        return reply

    async def Connect(self, request, context):
        reply = await self._run(f"Connect {request.id}",
                                self._guest("Connect", request, v3.ConnectResponse))
        reply.shim_pid = self.pod.vmm_pid  # the host process holding the pod's containers
        return reply

    async def Shutdown(self, request, context):
        """containerd calls this after each container's Delete; the pod lives on (only the
        Controller stops pods), so nothing is forwarded."""
        return empty_pb2.Empty()

    async def Events(self, request, context):
        raise RpcError(Code.UNIMPLEMENTED,
                       "task event streaming is not offered; events go to containerd's Events service")


def vm_death_exit(pod) -> v3.WaitResponse:
    """The Wait answer for a process whose VM is gone: status 255 at the VM's death."""
    return v3.WaitResponse(exit_status=UNKNOWN_EXIT_STATUS,
                           exited_at=timestamp(pod.exited_at_ns or time.time_ns()))
