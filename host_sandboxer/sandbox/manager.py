"""Every pod of the daemon, by ID: creation, lookup, removal, and recovery after a restart."""

import asyncio
import logging

import grpc

from host_sandboxer.containment import cgroups, helpers
from host_sandboxer.containment.cgroups import Cgroup, CgroupError, Layout
from host_sandboxer.containment.uids import UidRange, UidRangeError
from host_sandboxer.sandbox import lifecycle
from host_sandboxer.sandbox.ids import InvalidID, check_id
from host_sandboxer.sandbox.netns_path import check_netns_path
from host_sandboxer.sandbox.pod import UNKNOWN_EXIT_STATUS, Pod
from host_sandboxer.sandbox.podconfig import PodConfigError, parse_pod_config
from host_sandboxer.sandbox.statedir import StateDir
from host_sandboxer.taskproxy.errors import HostError
from host_sandboxer.taskproxy.service import HELD_CALLS, task_service
from host_sandboxer.taskrelay.link import RelayError, TaskRelay
from host_sandboxer.vmm import process
from host_sandboxer.vmm.template import TemplateStore
from host_sandboxer.vmm.vsock_backend import VsockBackend
from vmm_common import userns

log = logging.getLogger(__name__)

# How long a restarted daemon waits for its pods to be taken over before it serves the
# Controller: a pod not taken over by then (its VM or agent does not answer) is reported
# NOTREADY with the reason, and taken over in the background when it answers.
RECOVERY_WAIT_S = 5.0
DRAIN_S = 10.0  # a daemon leaving (SIGTERM) lets the Task calls under way finish for this long


def _parse_options(options):
    return parse_pod_config(options.type_url, options.value)


class Sandboxes:
    def __init__(self, state_dir: StateDir, config, publisher):
        """CgroupError if the cgroups the configuration asks for cannot be made."""
        self.state_dir = state_dir
        self.config = config
        self.publisher = publisher
        self.pods: dict[str, Pod] = {}
        containment = config.containment
        self.vsock_backend = VsockBackend(  # every pod's hybrid vsock, in one process
            state_dir.root, user=containment.backend_uid if containment.backend_user else None)
        # [vm] template: pods' VMs restored from the daemon's templates (vmm/template.py).
        self.templates = TemplateStore(state_dir.root) if config.vm.template else None
        self.uids = UidRange(containment.vmm_uid_base, containment.vmm_uids) if containment.vmm_user else None
        self.cgroup_layout = Layout.probe() if containment.cgroups else None
        if self.cgroup_layout is not None:
            helpers_cgroup = Cgroup.at(self.cgroup_layout, cgroups.helpers_path(containment.cgroup_parent))
            helpers_cgroup.create()
            helpers.use_cgroup(helpers_cgroup)
        self.task_relay = TaskRelay(state_dir.root, self.task_service)  # every pod's task address
        self._recovering: asyncio.Task | None = None

    def get(self, sandbox_id: str) -> Pod:
        try:
            check_id("sandbox", sandbox_id)
        except InvalidID as exc:
            raise HostError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        pod = self.pods.get(sandbox_id)
        if pod is None:
            raise HostError(grpc.StatusCode.NOT_FOUND, f"sandbox {sandbox_id!r} not found")
        return pod

    def create(self, sandbox_id: str, namespace: str, options, netns_path: str = "") -> Pod:
        try:
            check_id("sandbox", sandbox_id)
        except InvalidID as exc:
            raise HostError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if sandbox_id in self.pods:
            raise HostError(grpc.StatusCode.ALREADY_EXISTS, f"sandbox {sandbox_id!r} already exists")
        check_netns_path(netns_path)
        try:
            pod_config = _parse_options(options)
        except PodConfigError as exc:
            raise HostError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"sandbox {sandbox_id}: options {options.type_url}: {exc}") from None
        try:
            userns.check(pod_config.userns)  # as a runc pod is refused, before anything is made
        except ValueError as exc:
            raise HostError(grpc.StatusCode.INVALID_ARGUMENT, f"sandbox {sandbox_id}: {exc}") from None
        pod = Pod(sandbox_id, self.state_dir, namespace, pod_config, options, self.publisher)
        try:
            self._contain(pod)
        except CgroupError as exc:
            raise HostError(grpc.StatusCode.INVALID_ARGUMENT, f"sandbox {sandbox_id}: {exc}") from None
        except UidRangeError as exc:
            raise HostError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"sandbox {sandbox_id}: {exc}") from None
        self.state_dir.create_sandbox_dir(sandbox_id)
        pod.netns_path = netns_path
        pod.save()
        self.pods[sandbox_id] = pod
        return pod

    def _contain(self, pod: Pod) -> None:
        """Decide the pod's QEMU uid and cgroup (made at Start: lifecycle.py)."""
        if self.uids is not None:
            pod.vmm_uid = self.uids.pick({other.vmm_uid for other in self.pods.values()})
        if self.cgroup_layout is not None:
            path = cgroups.pod_path(pod.pod_config.cgroup_parent, self.config.containment.cgroup_parent, pod.id)
            pod.cgroup = Cgroup.at(self.cgroup_layout, path)

    def forget(self, sandbox_id: str) -> None:
        self.pods.pop(sandbox_id, None)
        if not self.pods:  # the pods' mount namespace ends with the last pod (mountns)
            self.state_dir.mount_space.release()

    def task_service(self, sandbox_id: str):
        """The pod's Task API (a ttrpc.Server), None if there is no such pod."""
        pod = self.pods.get(sandbox_id)
        if pod is not None and pod.task_service is None:
            pod.task_service = task_service(pod)
        return pod.task_service if pod is not None else None

    async def recover(self) -> None:
        """Load every pod recorded in the state dir, and take the running ones over.

        A pod that was ready is taken over with its running VM (lifecycle.recover: QMP, console
        and vsock reconnect), all pods at once; this returns when they are, or after
        RECOVERY_WAIT_S (the rest goes on in the background). If its VM died meanwhile it is
        recovered as stopped (exit 255): Wait and Status report it, exit events of its
        containers are published, Shutdown cleans up. A pod still being created when the daemon
        died may have left a VM starting: its processes are killed, and containerd may Start it
        again. The task relay (with containerd's connections and the calls they made meanwhile)
        is taken over before any pod, and serves every started pod's task address. A vsock
        backend left serving none of the recovered pods is stopped.
        """
        loop = asyncio.get_running_loop()
        for sandbox_id, record in self.state_dir.load_all().items():
            try:
                pod = Pod.from_record(record, self.state_dir, self.publisher, _parse_options)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("sandbox %s: state file unusable (%s); left on disk", sandbox_id, exc)
                continue
            self.pods[sandbox_id] = pod
            if pod.state == "ready":
                pod.recovery = loop.create_future()  # its Task calls wait for lifecycle.recover
            elif pod.state == "created":
                killed = process.kill_strays(pod.dir)
                if pod.cgroup is not None:  # its virtiofsd's sandboxed child names no path
                    killed += sorted(pod.cgroup.pids() - set(killed))
                    pod.cgroup.kill()
                for pid in killed:
                    log.warning("sandbox %s: killed process %d left by a Start the daemon did not finish",
                                sandbox_id, pid)
                if self.templates is not None:  # a clone's RAM file, which no record names yet
                    self.templates.clone_ram_path(lifecycle.vm_name(pod)).unlink(missing_ok=True)
            elif pod.state == "stopped":
                pod.vm_exited.set_result(pod.exit_status)
        try:
            await self.task_relay.resume({pod.id: pod.task_socket for pod in self.pods.values()
                                          if pod.state != "created"})
        except RelayError as exc:
            log.error("%s: pods' task addresses are not served until a pod starts", exc)
        recoveries = [asyncio.ensure_future(self._recover(pod)) for pod in self.pods.values()
                      if pod.state == "ready"]
        pending = (await asyncio.wait(recoveries, timeout=RECOVERY_WAIT_S))[1] if recoveries else ()
        if pending:
            log.warning("%d pod(s) not taken over within %g s: NOTREADY until they are",
                        len(pending), RECOVERY_WAIT_S)
            self._recovering = asyncio.ensure_future(self._after_recovery(pending))
        else:
            await self.vsock_backend.stop_if_idle()

    async def _recover(self, pod: Pod) -> None:
        try:
            await lifecycle.recover(pod, self.config, self.vsock_backend)
        except Exception as exc:  # one pod's surprise must not keep the daemon down
            log.exception("sandbox %s: recovery failed", pod.id)
            pod.mark_exited(UNKNOWN_EXIT_STATUS, f"recovery failed: {type(exc).__name__}: {exc}")
        log.info("sandbox %s recovered (%s%s)", pod.id, pod.state, f": {pod.unhealthy}" if pod.unhealthy else "")

    async def _after_recovery(self, pending) -> None:
        """The pods taken over late: once they are, a backend serving none of them is stopped."""
        await asyncio.gather(*pending)
        await self.vsock_backend.stop_if_idle()

    async def close(self) -> None:
        """The daemon is leaving (its pods are not): let the Task calls under way finish (not
        the held Waits: the relay hands them to the next daemon), then let go of the relay."""
        if self._recovering is not None:
            self._recovering.cancel()
        await self.task_relay.close(HELD_CALLS, DRAIN_S)
