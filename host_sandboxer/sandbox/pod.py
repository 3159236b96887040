"""One pod: its record on disk, its VM, its agent link, its containers' host-side state.

States (the record's `state`): created (Controller.Create) → ready (Start booted the VM and
set the sandbox up) → stopped (Stop, or the VMM died). The record is rewritten atomically on
every change so a restarted daemon knows every pod and what to clean up.
"""

import asyncio
import base64
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import any_pb2, timestamp_pb2

from host_sandboxer.containment.cgroups import Cgroup
from host_sandboxer.events import pack
from host_sandboxer.sandbox.podconfig import PodConfig
from host_sandboxer.sandbox.statedir import StateDir
from host_sandboxer.taskproxy.bundle import GuestBundle
from host_sandboxer.taskproxy.errors import HostError
from host_sandboxer.taskproxy.stdio import PortAllocator, ProcessStdio
from host_sandboxer.taskproxy.streaming import StreamHub
from vmm_common.protos.containerd.events import task_pb2

log = logging.getLogger(__name__)

READY, NOT_READY = "SANDBOX_READY", "SANDBOX_NOTREADY"
GUEST_POD_NS_DIR = "/run/sandbox-ns"
UNKNOWN_EXIT_STATUS = 255  # containerd's value for an exit nobody saw
REMEMBERED_REMOVALS = 1024  # deleted processes whose late events (exit, delete) may still pass


def timestamp(ns: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(ns)
    return stamp


@dataclass
class Container:
    """Host-side state of one container: its bundle under the pod's mounts/ and its stdio relays."""

    host_bundle: str
    bundle: GuestBundle
    processes: dict[str, ProcessStdio] = field(default_factory=dict)  # "" = init


class Pod:
    def __init__(self, sandbox_id: str, state_dir: StateDir, namespace: str,
                 pod_config: PodConfig, options: any_pb2.Any, publisher):
        self.id = sandbox_id
        self.state_dir = state_dir
        self.dir: Path = state_dir.sandbox_dir(sandbox_id)
        self.mounts_dir = self.dir / "mounts"  # host-only: containers' bundles and mounts
        self.shared_dir = self.dir / "shared"  # what the guest mounts: a read-only view of mounts/
        self.task_socket = self.dir / "task.sock"
        self.stdio_dir = self.dir / "stdio"  # how far each stdio stream got (taskproxy/delivered.py)
        self.namespace = namespace
        self.pod_config = pod_config
        self.options = options
        self.netns_path = ""     # the pod's network namespace from Controller.Create ("": host network)
        self.publisher = publisher
        self.state = "created"
        self.created_at_ns = time.time_ns()
        self.exited_at_ns = 0
        self.exit_status = 0
        self.exit_reason = ""    # why the pod ended, in words (Status verbose `exit_reason`)
        self.unhealthy = ""      # why the running pod is not healthy ("": it is): sharefs_watch.py
        self.vmm_pid = 0
        self.vmm_uid: int | None = None  # QEMU's own uid (containment/uids.py); None: root
        self.cgroup: Cgroup | None = None  # where QEMU and virtiofsd run (containment/cgroups.py)
        self.vm = None           # host_sandboxer.vmm.vm.GuestVm while it runs
        self.vm_record: dict | None = None  # GuestVm.record(): its processes, for a restarted daemon
        self.agent = None        # AgentLink
        self.task_service = None  # its Task API (taskproxy.service.task_service), made on first use
        self.streams = StreamHub()  # containerd's Stream calls for its stdio (io_type = "streaming")
        self.port_forward = None  # host_sandboxer.portforward.PortForwarder (pods with a netns)
        self.boot_info: dict[str, object] = {}  # Status verbose info (sandbox/status_info.py)
        self.ports = PortAllocator()
        self.containers: dict[str, Container] = {}
        self.known_container_ids: set[str] = set()  # ever created here: their events may pass
        self.removed_processes: dict[tuple[str, str], None] = {}  # the last ones, oldest first
        self.vm_exited: asyncio.Future = asyncio.get_running_loop().create_future()
        # Resolved once a restarted daemon has taken the pod over (Task calls wait for it).
        self.recovery: asyncio.Future = asyncio.get_running_loop().create_future()
        self.recovery.set_result(None)
        self.stopping = False
        self.watchers: list[asyncio.Task] = []  # VM death watch, event pump, sharefs probe
        self.lock = asyncio.Lock()  # serialises Start/Stop/Shutdown of this pod

    # -- persistence --------------------------------------------------------------------------

    def record(self) -> dict:
        return {
            "id": self.id, "namespace": self.namespace, "state": self.state,
            "created_at_ns": self.created_at_ns, "exited_at_ns": self.exited_at_ns,
            "exit_status": self.exit_status, "exit_reason": self.exit_reason, "vmm_pid": self.vmm_pid,
            "netns_path": self.netns_path,
            "vmm_uid": self.vmm_uid, "cgroup": self.cgroup.record() if self.cgroup else None,
            "vm": self.vm_record,
            "options": {"type_url": self.options.type_url,
                        "value": base64.b64encode(self.options.value).decode()},
            "next_port": self.ports.next,
            "containers": {cid: {"bundle": c.host_bundle,
                                 "processes": {exec_id: stdio.record() for exec_id, stdio in c.processes.items()}}
                           for cid, c in self.containers.items()},
        }

    def save(self) -> None:
        self.state_dir.write_state(self.id, self.record())

    @classmethod
    def from_record(cls, record: dict, state_dir: StateDir, publisher, parse_options) -> "Pod":
        options = any_pb2.Any(type_url=record["options"]["type_url"],
                              value=base64.b64decode(record["options"]["value"]))
        pod = cls(record["id"], state_dir, record["namespace"], parse_options(options), options, publisher)
        pod.state = record["state"]
        pod.created_at_ns = record["created_at_ns"]
        pod.exited_at_ns = record["exited_at_ns"]
        pod.exit_status = record["exit_status"]
        pod.exit_reason = record.get("exit_reason", "")
        pod.vmm_pid = record["vmm_pid"]
        pod.netns_path = record.get("netns_path", "")
        pod.vmm_uid = record.get("vmm_uid")
        pod.cgroup = Cgroup.from_record(record.get("cgroup"))
        pod.vm_record = record.get("vm")
        pod.ports = PortAllocator(record["next_port"])
        for cid, saved in record["containers"].items():
            if isinstance(saved, str):  # written before stdio was recorded: {cid: host bundle}
                saved = {"bundle": saved, "processes": {}}
            processes = {exec_id: ProcessStdio.from_record(stdio, pod.stdio_dir)
                         for exec_id, stdio in saved["processes"].items()}
            pod.containers[cid] = Container(saved["bundle"], GuestBundle(pod.mounts_dir, cid), processes)
            pod.known_container_ids.add(cid)
        return pod

    # -- what the task proxy uses -------------------------------------------------------------

    @property
    def transport(self):
        return self.vm

    def pod_namespaces(self) -> dict[str, str | None]:
        return {"ipc": f"{GUEST_POD_NS_DIR}/ipc", "uts": f"{GUEST_POD_NS_DIR}/uts",
                "pid": f"{GUEST_POD_NS_DIR}/pid" if self.pod_config.shared_pid else None}

    async def agent_call(self, service, method, request, response_type, timeout=30.0):
        if self.state != "ready" or self.agent is None:
            raise HostError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"pod {self.id} is not running (state {self.state})")
        return await self.agent.call(service, method, request, response_type, timeout=timeout)

    def container(self, container_id: str) -> Container:
        try:
            return self.containers[container_id]
        except KeyError:
            raise HostError(grpc.StatusCode.NOT_FOUND,
                            f"container {container_id!r} not found in pod {self.id}") from None

    def add_container(self, container_id: str, host_bundle: str, stdio: ProcessStdio) -> None:
        self.containers[container_id] = Container(host_bundle, GuestBundle(self.mounts_dir, container_id),
                                                  {"": stdio})
        self.known_container_ids.add(container_id)
        self.save()

    def add_process(self, container: Container, exec_id: str, stdio: ProcessStdio) -> None:
        container.processes[exec_id] = stdio
        self.save()

    async def remove_process(self, container: Container, exec_id: str) -> None:
        stdio = container.processes.pop(exec_id, None)
        if stdio is not None:
            self._remember_removal(container.bundle.container_id, exec_id)
            await stdio.close()
            self.save()

    def knows_process(self, container_id: str, exec_id: str) -> bool:
        """Whether the process ("" = init) is, or lately was, one of this pod's: a guest
        event about it may pass (its exit and delete arrive after the host removed it)."""
        container = self.containers.get(container_id)
        return ((container is not None and exec_id in container.processes)
                or (container_id, exec_id) in self.removed_processes)

    def _remember_removal(self, container_id: str, exec_id: str) -> None:
        self.removed_processes[(container_id, exec_id)] = None
        if len(self.removed_processes) > REMEMBERED_REMOVALS:
            del self.removed_processes[next(iter(self.removed_processes))]

    def resume_stdio(self) -> None:
        """A restarted daemon: relay again every process's stdio, from where each stream got."""
        for container in self.containers.values():
            for stdio in container.processes.values():
                stdio.start(self.transport, self.streams)

    async def release_stdio(self) -> None:
        """The VM is gone while no daemon relayed its stdio: end every stream for containerd."""
        for container in self.containers.values():
            for stdio in container.processes.values():
                await stdio.release_keepers()

    async def remove_container(self, container_id: str) -> None:
        container = self.containers.pop(container_id, None)
        if container is None:
            return
        for exec_id, stdio in container.processes.items():
            self._remember_removal(container_id, exec_id)
            await stdio.close()
        # Off the loop: it walks what the guest wrote in the bundle (bounded: pod_tmpfs.py).
        await asyncio.to_thread(container.bundle.cleanup)
        self.save()

    # -- exits --------------------------------------------------------------------------------

    def mark_exited(self, status: int, reason: str) -> None:
        """The VM is gone: record it, end Waits, publish exits of the pod's processes."""
        if self.vm_exited.done():
            return
        self.state = "stopped"
        self.exit_status = status
        self.exit_reason = reason
        self.exited_at_ns = time.time_ns()
        self.vm_exited.set_result(status)
        if not self.stopping:
            log.error("pod %s: %s", self.id, reason)
            self._publish_exits()
        self.save()

    def _publish_exits(self) -> None:
        for cid, container in self.containers.items():
            for exec_id in set(container.processes) | {""}:
                event = task_pb2.TaskExit(container_id=cid, id=exec_id or cid,
                                          exit_status=UNKNOWN_EXIT_STATUS,
                                          exited_at=timestamp(self.exited_at_ns))
                self.publisher.publish(self.namespace, "/tasks/exit", pack(event), source=self.id)

    def status_state(self) -> str:
        healthy = self.state == "ready" and not self.vm_exited.done() and not self.unhealthy
        return READY if healthy else NOT_READY
