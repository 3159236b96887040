"""grpc.SandboxService (Kuasar's sandbox.proto): pod setup, networking, clock, events, debug exec.

Every failure is an RpcError with a status code and a message naming the problem. In dev mode
the agent shares the host's kernel: it refuses to change what belongs to the host (the clock,
global sysctls, and the network unless started with --manage-network, i.e. in a network
namespace of its own).
"""

import asyncio
import logging
import os
import time

from google.protobuf import empty_pb2

from vmm_common import ttrpc
from vmm_common.protos.containerd.services.ttrpc.events.v1 import events_pb2
from vmm_common.protos import SANDBOX_SERVICE as SERVICE
from vmm_common.protos.kuasar import sandbox_pb2 as pb

log = logging.getLogger(__name__)
EVENTS_NAMESPACE = "k8s.io"  # as Kuasar's agent; the host re-publishes under the pod's own
Code = ttrpc.Code
RpcError = ttrpc.RpcError


def register(server, ctx) -> None:
    service = SandboxService(ctx)
    server.register(SERVICE, {
        "Check": ttrpc.unary(pb.CheckRequest, service.check),
        "SetupSandbox": ttrpc.unary(pb.SetupSandboxRequest, service.setup_sandbox),
        "UpdateInterfaces": ttrpc.unary(pb.UpdateInterfacesRequest, service.update_interfaces),
        "UpdateRoutes": ttrpc.unary(pb.UpdateRoutesRequest, service.update_routes),
        "SyncClock": ttrpc.unary(pb.SyncClockPacket, service.sync_clock),
        "GetEvents": ttrpc.unary(empty_pb2.Empty, service.get_events),
        "ExecVMProcess": ttrpc.unary(pb.ExecVMProcessRequest, service.exec_vm_process),
    })


class SandboxService:
    def __init__(self, ctx):
        self.ctx = ctx
        self._setup_lock = asyncio.Lock()
        self._network_lock = asyncio.Lock()  # netlink changes one request at a time

    async def check(self, _request, _call) -> empty_pb2.Empty:
        return empty_pb2.Empty()

    # -- pod -----------------------------------------------------------------------------------

    async def setup_sandbox(self, request: pb.SetupSandboxRequest, _call) -> empty_pb2.Empty:
        from vmm_task.pod import setup

        async with self._setup_lock:
            if self.ctx.sandbox.ready:
                raise RpcError(Code.FAILED_PRECONDITION, "SetupSandbox was already done")
            try:
                config = setup.decode_config(request.config.type_url, request.config.value)
            except ValueError as e:
                raise RpcError(Code.INVALID_ARGUMENT, str(e)) from None
            if request.interfaces or request.routes:
                self._require_own_network("SetupSandbox with interfaces or routes")
            marks = [time.monotonic()]  # where SetupSandbox's time goes, logged at the end
            if not self.ctx.dev_mode:  # the host's kernel is not ours to reseed
                await _reseed_crng()
            marks.append(time.monotonic())
            self._mount_share_late()
            marks.append(time.monotonic())
            try:
                namespaces = await setup.setup_pod(self.ctx, config)
            except ValueError as e:
                raise RpcError(Code.INVALID_ARGUMENT, str(e)) from None
            except setup.HostProtected as e:
                raise RpcError(Code.FAILED_PRECONDITION, str(e)) from None
            except OSError as e:
                raise RpcError(Code.INTERNAL, f"pod setup failed: {e}") from None
            marks.append(time.monotonic())
            try:
                await self._configure_network(request.interfaces, request.routes)
                setup.write_pod_files(self.ctx, config, _addresses(request.interfaces))
            except BaseException:
                setup.undo_pod(self.ctx, namespaces)
                raise
            marks.append(time.monotonic())
            self.ctx.sandbox.ready = True
            log.info("sandbox set up: hostname=%r namespaces=%s; seconds: reseed %.3f, share %.3f, "
                     "namespaces %.3f, network and files %.3f", config.hostname, self.ctx.sandbox.namespaces,
                     *(b - a for a, b in zip(marks, marks[1:])))
        return empty_pb2.Empty()

    def _mount_share_late(self) -> None:
        """The shared directory, if boot could not mount it (a VM template's clone gets its
        device hot-plugged after the restore). Logged, not fatal: a pod without a share fails
        later, naming the missing files."""
        ctx = self.ctx
        if ctx.sharefs_type is None or os.path.ismount(ctx.state_dir):
            return
        from vmm_task.init.mounts import mount_shared_dir

        for problem in mount_shared_dir(ctx.sharefs_type, ctx.state_dir):
            log.warning("shared directory still not mounted: %s", problem)

    # -- network -------------------------------------------------------------------------------

    async def update_interfaces(self, request: pb.UpdateInterfacesRequest, _call):
        self._require_own_network("UpdateInterfaces")
        await self._configure_network(request.interfaces, ())
        return empty_pb2.Empty()

    async def update_routes(self, request: pb.UpdateRoutesRequest, _call):
        self._require_own_network("UpdateRoutes")
        await self._configure_network((), request.routes)
        return empty_pb2.Empty()

    async def _configure_network(self, interfaces, routes) -> None:
        if not interfaces and not routes:
            return
        from vmm_task.netlink.errors import NetworkConfigError

        async with self._network_lock:
            try:
                if interfaces:
                    from vmm_task.netlink.links import update_interfaces
                    await update_interfaces(interfaces)
                if routes:
                    from vmm_task.netlink.routes import update_routes
                    await update_routes(routes)
            except NetworkConfigError as e:
                raise RpcError(Code.NOT_FOUND if e.not_found else Code.INVALID_ARGUMENT,
                               str(e)) from None

    def _require_own_network(self, what: str) -> None:
        if not self.ctx.manage_network:
            raise RpcError(Code.FAILED_PRECONDITION,
                           f"{what}: dev mode would change the host's network; run the agent in "
                           "a network namespace of its own with --manage-network")

    # -- clock ---------------------------------------------------------------------------------

    async def sync_clock(self, packet: pb.SyncClockPacket, _call) -> pb.SyncClockPacket:
        """Two steps (Kuasar's protocol). Delta 0: stamp our receive and send times so the host
        can compute the offset. Delta != 0: move CLOCK_REALTIME by Delta ns (either sign)."""
        reply = pb.SyncClockPacket()
        reply.CopyFrom(packet)
        if packet.Delta == 0:
            reply.ClientArriveTime = time.clock_gettime_ns(time.CLOCK_REALTIME)
            reply.ServerSendTime = time.clock_gettime_ns(time.CLOCK_REALTIME)
            return reply
        if self.ctx.dev_mode:
            raise RpcError(Code.FAILED_PRECONDITION,
                           "SyncClock: dev mode does not set the host's clock")
        try:
            set_realtime_by(packet.Delta)
        except ValueError as e:
            raise RpcError(Code.INVALID_ARGUMENT, f"SyncClock: {e}") from None
        except OSError as e:
            raise RpcError(Code.INTERNAL, f"SyncClock: clock_settime failed: {e}") from None
        return reply

    # -- events --------------------------------------------------------------------------------

    async def get_events(self, _request, call) -> events_pb2.Envelope:
        """The oldest queued task event, waiting for one (the host calls this in a loop).

        If the answer never reaches the host, the event goes back to the head of the queue."""
        event = await self.ctx.events.next()
        call.undelivered.append(lambda: self.ctx.events.put_back(event))
        envelope = events_pb2.Envelope(namespace=EVENTS_NAMESPACE, topic=event.topic)
        envelope.timestamp.FromNanoseconds(event.timestamp_ns)
        envelope.event.type_url = event.message.DESCRIPTOR.full_name
        envelope.event.value = event.message.SerializeToString()
        return envelope

    # -- debug ---------------------------------------------------------------------------------

    async def exec_vm_process(self, request: pb.ExecVMProcessRequest, _call):
        """Run a command line in the guest and return its stdout (only with task.debug)."""
        if not self.ctx.debug:
            raise RpcError(Code.PERMISSION_DENIED,
                           "ExecVMProcess needs the guest booted with task.debug")
        from vmm_task.capture import OutputTooLarge, run_capture

        try:
            argv = _command_argv(request.command)
            result = await run_capture(self.ctx.reaper, argv, request.stdin)
        except ValueError as e:
            raise RpcError(Code.INVALID_ARGUMENT, f"ExecVMProcess: {e}") from None
        except OSError as e:
            raise RpcError(Code.NOT_FOUND, f"ExecVMProcess: cannot run {request.command!r}: "
                                           f"{e}") from None
        except OutputTooLarge as e:
            raise RpcError(Code.RESOURCE_EXHAUSTED, f"ExecVMProcess: {e}") from None
        if result.code != 0:
            raise RpcError(Code.UNKNOWN, f"command {request.command!r} exited with {result.code}:"
                                         f" {result.stderr.decode(errors='replace').strip()}")
        return pb.ExecVMProcessResponse(out=result.stdout.decode(errors="backslashreplace"))


async def _reseed_crng() -> None:
    """Before anything of the pod runs: a guest cloned from a template must not share the
    template's random numbers (vmm_task/pod/entropy.py)."""
    from vmm_task.pod import entropy

    try:
        await entropy.reseed()
    except FileNotFoundError as e:  # no virtio-rng (another host's VM): booted, never cloned by us
        log.warning("no CRNG reseed: %s", e)
    except OSError as e:
        raise RpcError(Code.INTERNAL, f"cannot reseed the kernel's random number generator: {e}") from None
    entropy.reseed_python()


def _command_argv(command: str) -> list[str]:
    """Kuasar runs the command with a shell; a guest without /bin/sh gets it split like one."""
    if not command.strip():
        raise ValueError("empty command")
    if os.path.exists("/bin/sh"):
        return ["/bin/sh", "-c", command]
    import shlex
    return shlex.split(command)


def set_realtime_by(delta_ns: int) -> None:
    target = time.clock_gettime_ns(time.CLOCK_REALTIME) + delta_ns
    if target <= 0:
        raise ValueError(f"delta {delta_ns} ns would move the clock before 1970")
    time.clock_settime_ns(time.CLOCK_REALTIME, target)


def _addresses(interfaces) -> list[str]:
    return [a.address for interface in interfaces for a in interface.IPAddresses]
