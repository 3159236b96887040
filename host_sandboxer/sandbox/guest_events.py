"""A pod's task events, pulled from its guest (grpc.SandboxService/GetEvents) for containerd.

The guest is untrusted, so what it sends is bounded and only read, never forwarded:
- size: an event over MAX_EVENT_BYTES is dropped, with a log line naming the pod;
- rate: each pod has a budget (RATE_PER_S, bursts of BURST); a guest that sends faster is
  pulled from more slowly, so its flood waits in its own guest and costs no other pod;
- content: the event containerd gets is built by the host from fields it checked: a task
  topic with its message type, container and exec ids of this pod's processes, numbers
  (pids, exit status), valid timestamps, and the host's own paths (bundle, stdio FIFOs).
  Pids are the guest's: the Task API already gave containerd those numbers (Create, Start,
  State, Pids) and CRI matches TaskExit.pid against Start's, so they must stay the same.
Repeats (GetEvents is at-least-once) are dropped (events.RecentEvents).
"""

import asyncio
import logging
import time

from google.protobuf import empty_pb2, timestamp_pb2
from google.protobuf.message import DecodeError

from host_sandboxer.events import RecentEvents, pack
from vmm_common import ttrpc
from vmm_common.capped_text import capped
from vmm_common.protos.containerd.events import task_pb2
from vmm_common.protos.containerd.services.ttrpc.events.v1 import events_pb2 as guest_events
from vmm_common.protos import SANDBOX_SERVICE

log = logging.getLogger(__name__)

MAX_EVENT_BYTES = 64 * 1024  # a real task event is a few hundred bytes
RATE_PER_S = 100.0           # sustained events a pod may send (exec probes: ~4 per exec)
BURST = 500                  # a pod starting many containers at once
RETRY_S = 0.5
_MAX_SECONDS = 253402300799  # 9999-12-31T23:59:59Z, the last time a Timestamp may hold


class Refused(Exception):
    """Why a guest event is not published."""


class Budget:
    """A token bucket: `take()` returns at once while tokens last, then at `rate` per second."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._tokens = float(burst)
        self._at = time.monotonic()

    def delay(self) -> float:
        """Take a token; how long to wait before using it (0: none)."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


async def pump(pod, rate: float = RATE_PER_S, burst: int = BURST) -> None:
    """Carry the guest's task events (GetEvents blocks until one is queued) to containerd
    until the VM is gone, each once, within the pod's budget."""
    recent = RecentEvents()
    budget = Budget(rate, burst)
    throttled = False
    while not pod.vm_exited.done():
        wait = budget.delay()
        if wait and not throttled:
            log.warning("pod %s: guest sends events faster than %g/s: pulling them more slowly",
                        pod.id, rate)
        throttled = bool(wait)
        await asyncio.sleep(wait)
        try:
            envelope = await pod.agent.call(SANDBOX_SERVICE, "GetEvents", empty_pb2.Empty(),
                                            guest_events.Envelope, timeout=None)
        except (ConnectionError, ttrpc.RpcError) as exc:
            if pod.vm_exited.done():
                return
            log.warning("pod %s: GetEvents failed (%s); retrying", pod.id, exc)
            await asyncio.sleep(RETRY_S)
            continue
        size = envelope.ByteSize()
        if size > MAX_EVENT_BYTES:
            log.warning("pod %s: guest event of %d bytes dropped (at most %d)",
                        pod.id, size, MAX_EVENT_BYTES)
            continue
        if not recent.first_time(envelope):
            log.info("pod %s: guest event %s delivered again: dropped", pod.id, capped(envelope.topic))
            continue
        try:
            event = rebuild(envelope.topic, envelope.event, pod)
        except Refused as exc:
            log.warning("pod %s: guest event dropped: %s", pod.id, exc)
            continue
        pod.publisher.publish(pod.namespace, envelope.topic, pack(event), source=pod.id)


def rebuild(topic: str, event, pod):
    """The message the host publishes for the guest's `event` under `topic`; Refused if the
    guest may not say it."""
    if topic not in _BUILDERS:
        raise Refused(f"topic {capped(topic, 100)!r} is not a task event")
    message_type, build = _BUILDERS[topic]
    if event.type_url != message_type.DESCRIPTOR.full_name:
        raise Refused(f"topic {topic} carries {capped(event.type_url, 100)!r}, "
                      f"not {message_type.DESCRIPTOR.full_name}")
    try:
        said = message_type.FromString(event.value)
    except DecodeError as exc:
        raise Refused(f"undecodable {topic} event: {exc}") from None
    if said.container_id not in pod.known_container_ids:
        raise Refused(f"{topic} for container {capped(said.container_id, 100)!r}, "
                      "which is not in this pod")
    return build(said, pod)


def _process_id(said, exec_id: str, pod) -> str:
    """`exec_id` ("" = the init process) if the host knows that process of the container."""
    if not pod.knows_process(said.container_id, exec_id):
        raise Refused(f"exec {capped(exec_id, 100)!r} is not a process of container {said.container_id}")
    return exec_id


def _exited_process(said, pod) -> str:
    """TaskExit/TaskDelete name the process by `id`: the container's id for its init."""
    return said.id if said.id == said.container_id else _process_id(said, said.id, pod)


def _timestamp(said: timestamp_pb2.Timestamp) -> timestamp_pb2.Timestamp:
    """The guest's time if it is a valid Timestamp, else the host's now."""
    if 0 <= said.seconds <= _MAX_SECONDS and 0 <= said.nanos < 10**9:
        return timestamp_pb2.Timestamp(seconds=said.seconds, nanos=said.nanos)
    now = timestamp_pb2.Timestamp()
    now.FromNanoseconds(time.time_ns())
    return now


def _create(said: task_pb2.TaskCreate, pod):
    """The host's bundle and containerd's own FIFOs (rootfs and checkpoint are not repeated)."""
    container = pod.containers.get(said.container_id)
    init = container.processes.get("") if container is not None else None
    fifos = init.fifos if init is not None else {}
    return task_pb2.TaskCreate(
        container_id=said.container_id, pid=said.pid,
        bundle=container.host_bundle if container is not None else "",
        io=task_pb2.TaskIO(stdin=fifos.get("stdin", ""), stdout=fifos.get("stdout", ""),
                           stderr=fifos.get("stderr", ""), terminal=said.io.terminal))


def _start(said: task_pb2.TaskStart, pod):
    return task_pb2.TaskStart(container_id=said.container_id, pid=said.pid)


def _exit(said: task_pb2.TaskExit, pod):
    return task_pb2.TaskExit(container_id=said.container_id, id=_exited_process(said, pod),
                             pid=said.pid, exit_status=said.exit_status,
                             exited_at=_timestamp(said.exited_at))


def _delete(said: task_pb2.TaskDelete, pod):
    return task_pb2.TaskDelete(container_id=said.container_id, id=_exited_process(said, pod),
                               pid=said.pid, exit_status=said.exit_status,
                               exited_at=_timestamp(said.exited_at))


def _exec_added(said: task_pb2.TaskExecAdded, pod):
    return task_pb2.TaskExecAdded(container_id=said.container_id,
                                  exec_id=_process_id(said, said.exec_id, pod))


def _exec_started(said: task_pb2.TaskExecStarted, pod):
    return task_pb2.TaskExecStarted(container_id=said.container_id,
                                    exec_id=_process_id(said, said.exec_id, pod), pid=said.pid)


def _oom(said: task_pb2.TaskOOM, pod):
    return task_pb2.TaskOOM(container_id=said.container_id)


def _paused(said: task_pb2.TaskPaused, pod):
    return task_pb2.TaskPaused(container_id=said.container_id)


def _resumed(said: task_pb2.TaskResumed, pod):
    return task_pb2.TaskResumed(container_id=said.container_id)


def _checkpointed(said: task_pb2.TaskCheckpointed, pod):
    """The checkpoint's path is the guest's: not repeated."""
    return task_pb2.TaskCheckpointed(container_id=said.container_id)


_BUILDERS = {  # topic: (the message containerd publishes under it, its builder)
    "/tasks/create": (task_pb2.TaskCreate, _create),
    "/tasks/start": (task_pb2.TaskStart, _start),
    "/tasks/exit": (task_pb2.TaskExit, _exit),
    "/tasks/delete": (task_pb2.TaskDelete, _delete),
    "/tasks/exec-added": (task_pb2.TaskExecAdded, _exec_added),
    "/tasks/exec-started": (task_pb2.TaskExecStarted, _exec_started),
    "/tasks/oom": (task_pb2.TaskOOM, _oom),
    "/tasks/paused": (task_pb2.TaskPaused, _paused),
    "/tasks/resumed": (task_pb2.TaskResumed, _resumed),
    "/tasks/checkpointed": (task_pb2.TaskCheckpointed, _checkpointed),
}
