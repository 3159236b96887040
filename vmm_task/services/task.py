"""containerd.task.v2.Task over ttrpc: the container layer (vmm_task/container) behind
containerd's shim API, with the runc shim's error codes and its task events.

For a sandbox agent Shutdown is a no-op: containerd calls it after every container's Delete,
and only the Sandbox controller may stop the VM.
"""

import logging
import os
import time

from google.protobuf import any_pb2, empty_pb2, timestamp_pb2

from vmm_common.protos.containerd.events import task_pb2 as events
from vmm_common.protos.containerd.runc.v1 import oci_pb2
from vmm_common.protos.containerd.task.v2 import shim_pb2 as pb
from vmm_common.protos.containerd.types.task import task_pb2 as types
from vmm_task.container.errors import TaskError, invalid_argument
from vmm_task.container.process import CREATED, PAUSED, RUNNING, STOPPED

log = logging.getLogger(__name__)

_STATUS = {CREATED: types.CREATED, RUNNING: types.RUNNING, PAUSED: types.PAUSED,
           STOPPED: types.STOPPED}


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(ns)
    return stamp


class TaskService:
    def __init__(self, ctx):
        self._ctx = ctx
        self._table = None

    @property
    def table(self):
        """The container table, built (and the container layer imported) on first use: the
        agent's start, which the guest's boot waits for, does not pay for it."""
        if self._table is None:
            from vmm_task.container.runtime import Runtime, root_is_ramfs
            from vmm_task.container.table import ContainerTable
            from vmm_task.kuasar.storages import StorageTable

            ctx = self._ctx
            runtime = Runtime(ctx.reaper, ctx.runtime, os.path.join(ctx.run_dir, "oci"),
                              no_pivot=root_is_ramfs())
            self._table = ContainerTable(runtime, ctx.reaper, ctx.run_dir, self._pod,
                                         self._publish_exit, self._publish_oom, StorageTable())
        return self._table

    def _pod(self) -> tuple[dict, dict]:
        """What SetupSandbox made for the pod's containers: namespaces and files to bind."""
        sandbox = self._ctx.sandbox
        files = {"/etc/hosts": sandbox.hosts_path, "/etc/resolv.conf": sandbox.resolv_path}
        return dict(sandbox.namespaces), {dest: path for dest, path in files.items() if path}

    def _publish(self, topic: str, message) -> None:
        self._ctx.events.publish(topic, message)

    def _publish_exit(self, container, process) -> None:
        self._publish("/tasks/exit", events.TaskExit(
            container_id=container.id, id=process.exec_id or container.id, pid=process.pid,
            exit_status=process.exit_code, exited_at=_timestamp(process.exited_at)))

    def _publish_oom(self, container) -> None:
        self._publish("/tasks/oom", events.TaskOOM(container_id=container.id))

    # -- lifecycle ------------------------------------------------------------------------------

    async def create(self, req: pb.CreateTaskRequest) -> pb.CreateTaskResponse:
        if req.checkpoint or req.parent_checkpoint:
            raise TaskError("UNIMPLEMENTED", f"create of {req.id}: restoring from a checkpoint is "
                                             "not supported")
        from vmm_task.container.ids import check_id
        from vmm_task.container.options import create_options
        from vmm_task.container.stdio import Stdio
        from vmm_task.kuasar import convention

        cid = check_id("container", req.id)
        options = create_options(req.options if req.HasField("options") else None,
                                 f"create of {cid}")
        stdio = Stdio(req.stdin, req.stdout, req.stderr, req.terminal)
        shared = convention.shared_bundle(self._ctx.state_dir, cid, req.bundle)
        if shared is None:  # ours: the request's fields say it all (docs/kuasar.md)
            bundle, rootfs, storages = req.bundle, _rootfs_mounts(req.rootfs), []
        else:  # Kuasar's host: bundle, rootfs, stdio and volumes are in the shared directory
            bundle, rootfs = shared, []
            stdio = convention.init_stdio(shared, cid, stdio)
            storages = convention.storages(shared, cid)
        container = await self.table.create(cid, bundle, rootfs, await _with_ports(stdio),
                                            options, shared is not None, storages)
        pid = container.init.pid
        self._publish("/tasks/create", events.TaskCreate(
            container_id=req.id, bundle=req.bundle, rootfs=req.rootfs, pid=pid,
            io=events.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr,
                             terminal=req.terminal)))
        return pb.CreateTaskResponse(pid=pid)

    async def start(self, req: pb.StartRequest) -> pb.StartResponse:
        def started(process) -> None:
            if req.exec_id:
                self._publish("/tasks/exec-started", events.TaskExecStarted(
                    container_id=req.id, exec_id=req.exec_id, pid=process.pid))
            else:
                self._publish("/tasks/start", events.TaskStart(container_id=req.id,
                                                               pid=process.pid))

        process = await self.table.start(req.id, req.exec_id, started)
        return pb.StartResponse(pid=process.pid)

    async def delete(self, req: pb.DeleteRequest) -> pb.DeleteResponse:
        process = await self.table.delete(req.id, req.exec_id)
        exited_at = _timestamp(process.exited_at)
        self._publish("/tasks/delete", events.TaskDelete(
            container_id=req.id, id=req.exec_id or req.id, pid=process.pid,
            exit_status=process.exit_code, exited_at=exited_at))
        return pb.DeleteResponse(pid=process.pid, exit_status=process.exit_code,
                                 exited_at=exited_at)

    async def exec(self, req: pb.ExecProcessRequest) -> empty_pb2.Empty:
        from vmm_task.container.ids import check_id
        from vmm_task.container.stdio import Stdio

        container = self.table.get(req.id)
        stdio = Stdio(req.stdin, req.stdout, req.stderr, req.terminal)
        if container.shared_bundle:  # Kuasar's host: the exec's io file replaces its stdio
            from vmm_task.kuasar import convention
            exec_id = check_id("exec", req.exec_id)
            stdio = convention.exec_stdio(container.bundle, req.id, exec_id, stdio)
        await self.table.exec(req.id, req.exec_id, await _with_ports(stdio), req.spec.value)
        self._publish("/tasks/exec-added",
                      events.TaskExecAdded(container_id=req.id, exec_id=req.exec_id))
        return empty_pb2.Empty()

    async def kill(self, req: pb.KillRequest) -> empty_pb2.Empty:
        await self.table.kill(req.id, req.exec_id, req.signal, req.all)
        return empty_pb2.Empty()

    async def wait(self, req: pb.WaitRequest) -> pb.WaitResponse:
        process = await self.table.wait(req.id, req.exec_id)
        return pb.WaitResponse(exit_status=process.exit_code,
                               exited_at=_timestamp(process.exited_at))

    async def pause(self, req: pb.PauseRequest) -> empty_pb2.Empty:
        await self.table.pause(req.id)
        self._publish("/tasks/paused", events.TaskPaused(container_id=req.id))
        return empty_pb2.Empty()

    async def resume(self, req: pb.ResumeRequest) -> empty_pb2.Empty:
        await self.table.resume(req.id)
        self._publish("/tasks/resumed", events.TaskResumed(container_id=req.id))
        return empty_pb2.Empty()

    # -- queries and adjustments ----------------------------------------------------------------

    async def state(self, req: pb.StateRequest) -> pb.StateResponse:
        container = self.table.get(req.id)
        process = container.process(req.exec_id)
        io = process.io
        return pb.StateResponse(
            id=req.id, exec_id=req.exec_id, bundle=container.bundle, pid=process.pid,
            status=_STATUS[process.status], stdin=io.stdin, stdout=io.stdout, stderr=io.stderr,
            terminal=io.terminal, exit_status=process.exit_code,
            exited_at=_timestamp(process.exited_at) if process.exited else None)

    async def pids(self, req: pb.PidsRequest) -> pb.PidsResponse:
        response = pb.PidsResponse()
        for pid, exec_id in self.table.pids(req.id):
            info = response.processes.add(pid=pid)
            if exec_id:
                info.info.Pack(oci_pb2.ProcessDetails(exec_id=exec_id))
        return response

    async def stats(self, req: pb.StatsRequest) -> pb.StatsResponse:
        packed = any_pb2.Any()
        packed.Pack(self.table.stats(req.id))
        return pb.StatsResponse(stats=packed)

    async def update(self, req: pb.UpdateTaskRequest) -> empty_pb2.Empty:
        if not req.resources.value:
            raise invalid_argument(f"update of {req.id}: no resources given")
        await self.table.update(req.id, req.resources.value)
        return empty_pb2.Empty()

    async def resize_pty(self, req: pb.ResizePtyRequest) -> empty_pb2.Empty:
        self.table.resize(req.id, req.exec_id, req.width, req.height)
        return empty_pb2.Empty()

    async def close_io(self, req: pb.CloseIORequest) -> empty_pb2.Empty:
        if req.stdin:
            await self.table.close_io(req.id, req.exec_id)
        return empty_pb2.Empty()

    async def connect(self, req: pb.ConnectRequest) -> pb.ConnectResponse:
        container = self.table.get(req.id)
        return pb.ConnectResponse(shim_pid=os.getpid(), task_pid=container.init.pid,
                                  version="2")

    async def shutdown(self, req: pb.ShutdownRequest) -> empty_pb2.Empty:
        return empty_pb2.Empty()

    async def checkpoint(self, req: pb.CheckpointTaskRequest) -> empty_pb2.Empty:
        raise TaskError("UNIMPLEMENTED", f"checkpoint of {req.id}: checkpointing (CRIU) is not "
                                         "supported inside the vmm-task guest")


def _rootfs_mounts(rootfs) -> list:
    from vmm_task.container.mounts import Mount

    mounts = []
    for m in rootfs:
        if m.target:
            raise invalid_argument(f"rootfs mount {m.source!r}: a target inside the rootfs "
                                   f"({m.target!r}) is not supported")
        mounts.append(Mount(m.type, m.source, tuple(m.options)))
    return mounts


async def _with_ports(stdio):
    """`stdio` with virtio-serial port names replaced by their devices (Kuasar's stdio)."""
    from vmm_task.kuasar.virtio_ports import is_port_name, resolve_ports

    if any(is_port_name(value) for value in stdio[:3]):
        return await resolve_ports(stdio)
    return stdio


_METHODS = {
    "State": (pb.StateRequest, TaskService.state),
    "Create": (pb.CreateTaskRequest, TaskService.create),
    "Start": (pb.StartRequest, TaskService.start),
    "Delete": (pb.DeleteRequest, TaskService.delete),
    "Pids": (pb.PidsRequest, TaskService.pids),
    "Pause": (pb.PauseRequest, TaskService.pause),
    "Resume": (pb.ResumeRequest, TaskService.resume),
    "Checkpoint": (pb.CheckpointTaskRequest, TaskService.checkpoint),
    "Kill": (pb.KillRequest, TaskService.kill),
    "Exec": (pb.ExecProcessRequest, TaskService.exec),
    "ResizePty": (pb.ResizePtyRequest, TaskService.resize_pty),
    "CloseIO": (pb.CloseIORequest, TaskService.close_io),
    "Update": (pb.UpdateTaskRequest, TaskService.update),
    "Wait": (pb.WaitRequest, TaskService.wait),
    "Stats": (pb.StatsRequest, TaskService.stats),
    "Connect": (pb.ConnectRequest, TaskService.connect),
    "Shutdown": (pb.ShutdownRequest, TaskService.shutdown),
}


# Calls that change containers run to completion even when the caller gives up (deadline or
# lost connection): a Create cut short between `crun create` and the table entry would leave a
# container nobody can address. Their callers see the outcome through State/Wait/events.
_RUN_TO_COMPLETION = {"Create", "Start", "Delete", "Exec", "Kill", "Pause", "Resume", "Update",
                      "CloseIO"}


def methods(ctx) -> dict:
    """The service's methods for Server.register_lazy (see vmm_task.services)."""
    import asyncio

    from vmm_common import ttrpc

    service = TaskService(ctx)

    def guarded(name, method):
        async def handler(request, _call):
            started = time.monotonic()
            try:
                if name in _RUN_TO_COMPLETION:
                    work = asyncio.ensure_future(method(service, request))
                    work.add_done_callback(_retrieve)  # an abandoned failure is not "unretrieved"
                    return await asyncio.shield(work)
                return await method(service, request)
            except TaskError as e:
                raise ttrpc.RpcError(ttrpc.Code[e.code], f"{name}: {e}") from None
            except OSError as e:
                raise ttrpc.RpcError(ttrpc.Code.UNKNOWN, f"{name}: {e}") from None
            finally:
                log.debug("%s %s: %.1f ms", name, request.id, (time.monotonic() - started) * 1000)
        return handler

    return {name: ttrpc.unary(request_type, guarded(name, method))
            for name, (request_type, method) in _METHODS.items()}


def _retrieve(task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("%s", task.exception())
