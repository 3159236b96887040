"""containerd.services.sandbox.v1.Controller: the pod lifecycle containerd drives.

Each call finds the pod, runs under the pod's lock when it changes the pod, and turns
HostError into the gRPC status containerd sees. The task address returned by Start is
`ttrpc+unix://<task.sock>`: containerd.task.v3.Task over ttrpc, on a listener the node's task
relay holds (host_sandboxer/taskrelay/), so containerd's connections outlive the daemon.
"""

import asyncio
import logging
import os

import grpc

from host_sandboxer.events import namespace_of
from host_sandboxer.heap import release_free_heap
from host_sandboxer.sandbox import lifecycle, resize
from host_sandboxer.sandbox.metrics import vmm_metrics
from host_sandboxer.sandbox.pod import timestamp
from host_sandboxer.sandbox.status_info import verbose_info
from host_sandboxer.taskproxy.errors import HostError
from vmm_common.protos.containerd.services.sandbox.v1 import sandbox_pb2 as api
from vmm_common.protos.containerd.services.sandbox.v1 import sandbox_pb2_grpc as api_grpc
from vmm_common.protos.containerd.types import platform_pb2

log = logging.getLogger(__name__)

TASK_API_VERSION = 3
_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def task_address(pod) -> str:
    return f"ttrpc+unix://{pod.task_socket}"


def _guarded(method):
    """Run a handler, mapping HostError to its gRPC status and logging the failure."""
    async def handler(self, request, context):
        try:
            return await method(self, request, context)
        except HostError as exc:
            log.warning("%s %s: %s", method.__name__, getattr(request, "sandbox_id", ""), exc.message)
            await context.abort(exc.code, exc.message)
    handler.__name__ = method.__name__
    handler.__doc__ = method.__doc__
    return handler


class Controller(api_grpc.ControllerServicer):
    def __init__(self, sandboxes):
        self.sandboxes = sandboxes

    @_guarded
    async def Create(self, request, context):
        pod = self.sandboxes.create(request.sandbox_id, namespace_of(context), request.options,
                                    request.netns_path)
        log.info("sandbox %s created (ns %s)", pod.id, pod.namespace)
        return api.ControllerCreateResponse(sandbox_id=pod.id)

    @_guarded
    async def Start(self, request, context):
        pod = self.sandboxes.get(request.sandbox_id)
        async with pod.lock:
            if pod.state == "created":
                try:
                    await lifecycle.start(pod, self.sandboxes.config, self.sandboxes.vsock_backend,
                                          self.sandboxes.task_relay, self.sandboxes.templates)
                except HostError:
                    await self._discard(pod)
                    raise
                release_free_heap()
                log.info("sandbox %s started: VMM pid %d", pod.id, pod.vmm_pid)
            elif pod.state != "ready":
                raise HostError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"sandbox {pod.id} cannot start: it is {pod.state}")
        return api.ControllerStartResponse(
            sandbox_id=pod.id, pid=pod.vmm_pid, created_at=timestamp(pod.created_at_ns),
            address=task_address(pod), version=TASK_API_VERSION)

    async def _discard(self, pod) -> None:
        """A sandbox whose Start failed is forgotten by containerd 2.4, which sends no Shutdown
        for it (internal/cri/server/sandbox_run.go: its record is deleted), and its podsandbox
        controller removes what it made: so is ours removed, unless that fails (then Shutdown
        may try again)."""
        try:
            await lifecycle.shutdown(pod, self.sandboxes.task_relay)
        except HostError as exc:
            log.warning("sandbox %s: cleaning up after the failed Start: %s", pod.id, exc.message)
            return
        self.sandboxes.forget(pod.id)

    @_guarded
    async def Platform(self, request, context):
        self.sandboxes.get(request.sandbox_id)
        machine = os.uname().machine
        return api.ControllerPlatformResponse(
            platform=platform_pb2.Platform(os="linux", architecture=_ARCH.get(machine, machine)))

    @_guarded
    async def Stop(self, request, context):
        pod = self.sandboxes.get(request.sandbox_id)
        async with pod.lock:
            await lifecycle.stop(pod, float(request.timeout_secs))
        log.info("sandbox %s stopped", pod.id)
        return api.ControllerStopResponse()

    @_guarded
    async def Wait(self, request, context):
        pod = self.sandboxes.get(request.sandbox_id)
        # shielded: containerd cancelling its Wait (it restarts) must not cancel the pod's end
        status = await asyncio.shield(pod.vm_exited)
        return api.ControllerWaitResponse(exit_status=status, exited_at=timestamp(pod.exited_at_ns))

    @_guarded
    async def Status(self, request, context):
        pod = self.sandboxes.get(request.sandbox_id)
        response = api.ControllerStatusResponse(
            sandbox_id=pod.id, pid=pod.vmm_pid, state=pod.status_state(),
            created_at=timestamp(pod.created_at_ns), version=TASK_API_VERSION)
        if pod.state != "created":
            response.address = task_address(pod)
        if pod.vm_exited.done():
            response.exited_at.CopyFrom(timestamp(pod.exited_at_ns))
        if request.verbose:
            response.info.update(verbose_info(pod))
        return response

    @_guarded
    async def Shutdown(self, request, context):
        pod = self.sandboxes.get(request.sandbox_id)
        async with pod.lock:
            await lifecycle.shutdown(pod, self.sandboxes.task_relay)
            self.sandboxes.forget(pod.id)
        release_free_heap()
        log.info("sandbox %s shut down", pod.id)
        return api.ControllerShutdownResponse()

    @_guarded
    async def Metrics(self, request, context):
        pod = self.sandboxes.get(request.sandbox_id)
        if pod.state != "ready" or pod.vm_exited.done():
            raise HostError(grpc.StatusCode.FAILED_PRECONDITION, f"sandbox {pod.id} is not running")
        memory = int(pod.boot_info.get("memory_mib", 0)) * 1024 * 1024
        try:
            return api.ControllerMetricsResponse(metrics=vmm_metrics(pod.id, pod.vmm_pid, memory))
        except ProcessLookupError as exc:
            raise HostError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None

    @_guarded
    async def Update(self, request, context):
        """The record (labels, spec, extensions) lives in containerd: accepted. New pod resources
        resize the running VM where it can be done (more vCPUs): sandbox/resize.py."""
        pod = self.sandboxes.get(request.sandbox_id)
        async with pod.lock:
            await resize.apply_update(pod, request, self.sandboxes.config.vm)
        return api.ControllerUpdateResponse()
