"""Start, stop and shut down one pod: the VM, the agent setup, the task address, the watchers;
and `recover()` a pod a previous daemon left running (its VM outlives the daemon).

The task address is served by the node's task relay (host_sandboxer/taskrelay/), which holds
the listener and containerd's connections across daemon restarts: a recovered pod needs no new
listener, and calls containerd made meanwhile are answered once the pod is taken over."""

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import time

import grpc
from google.protobuf import empty_pb2

from host_sandboxer.containment.cgroups import CgroupError
from host_sandboxer.network import NetworkError
from host_sandboxer.network import pod as pod_network
from host_sandboxer.sandbox.agent import AgentLink
from host_sandboxer.sandbox import guest_events, sharefs_watch
from host_sandboxer.sandbox.pod import UNKNOWN_EXIT_STATUS, Pod
from host_sandboxer.taskproxy import mounts
from host_sandboxer.taskproxy.errors import HostError
from host_sandboxer.vmm.vm import GuestVm, VmError
from vmm_common import portforward, ttrpc
from vmm_common.protos import SANDBOX_SERVICE
from vmm_common.protos.containerd.task.v2 import shim_pb2 as task_v2
from vmm_common.protos.kuasar import sandbox_pb2

log = logging.getLogger(__name__)

TASK_SERVICE = "containerd.task.v2.Task"
CHECK_TIMEOUT_S = 10.0
RECHECK_INTERVAL_S = 5.0  # a recovered pod whose agent does not answer is asked again this often
SETUP_TIMEOUT_S = 10.0
DEFAULT_STOP_TIMEOUT_S = 10.0
VMM_EXIT_GRACE_S = 2.0  # a VMM that dies takes its vsock link and virtiofsd along: which ends first varies
UNIX_PATH_MAX = 107


def vm_name(pod: Pod) -> str:
    return f"vmm-{pod.id}"


def _pod_config(config, pod: Pod):
    """The daemon config with the VM sized from the pod's resources (clamped: podconfig.py)."""
    vm = dataclasses.replace(config.vm, cpus=pod.pod_config.vcpus(config.vm),
                             memory_mib=pod.pod_config.memory_mib(config.vm))
    return dataclasses.replace(config, vm=vm)


async def start(pod: Pod, config, vsock_backend, task_relay, templates=None) -> None:
    """Boot the pod's VM (detached: it outlives the daemon; hybrid vsock through the daemon's
    `vsock_backend` process), or restore it from `templates` (vmm/template.py) when given,
    check and set up the agent, serve the task address (through `task_relay`)."""
    if len(os.fsencode(pod.task_socket)) > UNIX_PATH_MAX:
        raise HostError(grpc.StatusCode.FAILED_PRECONDITION,
                        f"task socket path {pod.task_socket} is too long for a unix socket; "
                        "use a shorter --dir")
    began = time.monotonic()
    space = pod.state_dir.mount_space  # the pods' mount namespace (host_sandboxer/mountns)
    sized = _pod_config(config, pod)
    clamped = pod.pod_config.clamped(config.vm)
    if clamped:
        log.warning("pod %s: its limits ask for more than a VM gets: clamped %s", pod.id, clamped)
        pod.boot_info["clamped"] = clamped
    vm = GuestVm(sized, pod.dir, name=vm_name(pod), share_dir=pod.shared_dir, vsock_backend=vsock_backend,
                 cgroup=pod.cgroup, vmm_uid=pod.vmm_uid, mount_namespace=space.namespace_file,
                 templates=templates)
    vm.prepare()  # a clone's template and RAM copy, while the pod's mounts, cgroup and links are made
    try:
        try:
            space.ensure()  # on the loop: no other pod's Start or last Shutdown runs meanwhile
            await asyncio.to_thread(space.run, "pod_setup", str(pod.mounts_dir), str(pod.shared_dir),
                                    config.sharefs.tmpfs_size_mib, config.sharefs.tmpfs_inodes)
        except mounts.MountError as exc:
            raise HostError(grpc.StatusCode.FAILED_PRECONDITION, f"pod {pod.id}: {exc.strerror}") from None
        if pod.cgroup is not None:
            try:
                pod.cgroup.create()
            except CgroupError as exc:
                raise HostError(grpc.StatusCode.FAILED_PRECONDITION, f"pod {pod.id}: {exc}") from None
        try:
            attachment = await pod_network.plug(pod.dir, pod.netns_path, sized.vm.cpus)
        except NetworkError as exc:
            await _remove_cgroup(pod)
            raise HostError(grpc.StatusCode.FAILED_PRECONDITION, f"pod {pod.id}: {exc}") from None
    except BaseException:
        await vm.close()  # with the RAM copy it may have made meanwhile
        raise
    vm.nics = tuple(attachment.nics) if attachment else ()
    prepared = time.monotonic()
    try:
        timeline = await vm.start()
    except VmError as exc:
        code = grpc.StatusCode.FAILED_PRECONDITION if exc.stage in ("image", "config") \
            else grpc.StatusCode.UNAVAILABLE
        await _unplug(pod)
        await _remove_cgroup(pod)
        raise HostError(code, f"pod {pod.id}: VM failed to start ({exc.stage}): {exc}") from None
    finally:
        if attachment:
            attachment.close_fds()  # QEMU holds the taps now: they live as long as it does
    booted = time.monotonic()
    pod.vm = vm
    pod.vmm_pid = vm.qemu.proc.pid
    pod.vm_record = vm.record()
    pod.agent = AgentLink(vm.open_connection, pod.id, client=vm.hand_over_agent_client())
    try:
        # A VM restored from a template answered Check over its new vsock device already (vmm/clone.py).
        await _set_up_agent(pod, check=timeline.template is None)
        if attachment:
            networked = time.monotonic()
            await pod_network.configure_guest(pod.agent.call, attachment)
            forwarded = time.monotonic()
            await _open_port_forward(pod)
            pod.boot_info.update(guest_network_s=f"{forwarded - networked:.3f}",
                                 port_forward_s=f"{time.monotonic() - forwarded:.3f}")
        await task_relay.listen(pod.id, pod.task_socket)
    except BaseException as exc:
        refused = isinstance(exc, HostError) and exc.code == grpc.StatusCode.INVALID_ARGUMENT
        what = exc.message if isinstance(exc, HostError) else f"{type(exc).__name__}: {exc}"
        message = what if refused else vm.qemu.failure(f"pod {pod.id}: sandbox setup failed: {what}")
        await _close_vm(pod)
        await _unplug(pod)
        await _remove_cgroup(pod)
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise HostError(exc.code if refused else grpc.StatusCode.UNAVAILABLE, message) from None
    pod.boot_info.update({"boot_" + k: v for k, v in timeline.as_dict().items()})
    # Where Start's time went: before QEMU's spawn, the guest's boot, after the ready line.
    done = time.monotonic()
    pod.boot_info.update(start_total_s=f"{done - began:.3f}", setup_after_ready_s=f"{done - booted:.3f}",
                         before_qemu_s=f"{vm.qemu.started_at - began:.3f}", pod_prepare_s=f"{prepared - began:.3f}",
                         start_qemu_cpu_s=f"{vm.qemu.cpu_seconds() or 0:.2f}")  # under TCG: the guest's work
    pod.boot_info.update(accel=vm.accel.accel, vcpus=str(vm.config.vm.cpus),
                         memory_mib=str(vm.config.vm.memory_mib),
                         transport=str(getattr(vm.transport, "kind", config.vsock.transport)),
                         sharefs=config.sharefs.type)
    pod.state = "ready"
    pod.save()
    _watch(pod, config)


async def recover(pod: Pod, config, vsock_backend) -> None:
    """Take over a pod that was ready when the previous daemon ended: reconnect to its VM (QMP,
    console, vsock), check the agent, re-arm the watchers. A pod whose VM is gone or unreachable
    is marked exited (its containers' exits published) and whatever of it still ran is stopped;
    its task address still answers State/Delete from the host side, and Shutdown cleans up the
    rest. A VM that runs but whose agent does not answer is not stopped: the pod is NOTREADY,
    saying why, until it does (`_check_until_answered`). `pod.recovery` resolves once the VM is
    reattached and the agent was asked once: the pod's Task calls wait for it."""
    pod.unhealthy = "the restarted daemon is taking the pod over (QMP, console, vsock)"
    try:
        try:
            vm = await GuestVm.attach(_pod_config(config, pod), pod.dir, pod.vm_record or {},
                                      name=vm_name(pod), share_dir=pod.shared_dir,
                                      vsock_backend=vsock_backend)
        except VmError as exc:
            pod.unhealthy = ""
            pod.mark_exited(UNKNOWN_EXIT_STATUS, f"VM lost while the daemon was down ({exc.stage}): {exc}")
            await pod.release_stdio()
            return
        pod.vm = vm
        pod.agent = AgentLink(vm.open_connection, pod.id)
        pod.watchers = [asyncio.create_task(_watch_vm(pod), name=f"watch-{pod.id}")]
        if not await _check_until_answered(pod):
            await pod.release_stdio()  # the VM ended before its streams were taken over
            return
        pod.unhealthy = ""
        pod.boot_info["recovered_at_ns"] = str(time.time_ns())
        if pod.netns_path:
            await _open_port_forward(pod)
        pod.resume_stdio()
        _watch_guest(pod, config)
    finally:
        _taken_over(pod)


def _taken_over(pod: Pod) -> None:
    if not pod.recovery.done():
        pod.recovery.set_result(None)


async def _check_until_answered(pod: Pod) -> bool:
    """The agent's Check, asked again every RECHECK_INTERVAL_S until it answers (True) or the VM
    ends (False). Meanwhile `pod.unhealthy` says why (Status: NOTREADY) and the pod's Task calls
    go ahead after the first try: a guest that was slow or paused comes back by itself, one that
    is gone is the VM watch's (or the orchestrator's) to end."""
    began = time.monotonic()
    while not pod.vm_exited.done():
        try:
            await _check_agent(pod)
            return True
        except (HostError, ttrpc.RpcError) as exc:
            why = exc.message
        except (ConnectionError, OSError) as exc:
            why = str(exc)
        pod.unhealthy = (f"the restarted daemon has not reached the pod's agent "
                         f"(for {time.monotonic() - began:.0f} s): {why}")
        log.warning("pod %s: %s; asking again in %g s", pod.id, pod.unhealthy, RECHECK_INTERVAL_S)
        _taken_over(pod)
        await asyncio.wait({pod.vm_exited}, timeout=RECHECK_INTERVAL_S)
    return False


async def _open_port_forward(pod: Pod) -> None:
    """CRI's port-forward reaches the VM through the pod's netns (host_sandboxer/portforward,
    loaded with the first networked pod). Without it the pod still runs: the reason is logged
    and in Status's verbose info."""
    from host_sandboxer.portforward import PortForwarder
    try:
        pod.port_forward = await PortForwarder.open(
            pod.id, pod.netns_path, functools.partial(pod.vm.open_socket, portforward.VSOCK_PORT))
    except NetworkError as exc:
        log.warning("pod %s: no port-forwarding: %s", pod.id, exc)
        pod.boot_info["port_forward"] = f"unavailable: {exc}"
        return
    pod.boot_info["port_forward"] = f"127.0.0.1:{pod.port_forward.port} in {pod.netns_path}"


def _watch(pod: Pod, config) -> None:
    pod.watchers = [asyncio.create_task(_watch_vm(pod), name=f"watch-{pod.id}")]
    _watch_guest(pod, config)


def _watch_guest(pod: Pod, config) -> None:
    """The event pump and the shared-directory probe (once the agent answers)."""
    pod.watchers.append(asyncio.create_task(guest_events.pump(pod), name=f"events-{pod.id}"))
    if config.sharefs.check_interval_s > 0:
        pod.watchers.append(asyncio.create_task(sharefs_watch.watch(pod, config.sharefs.check_interval_s),
                                                name=f"sharefs-{pod.id}"))


async def _check_agent(pod: Pod) -> None:
    try:
        await asyncio.wait_for(pod.agent.call(SANDBOX_SERVICE, "Check", sandbox_pb2.CheckRequest(),
                                              empty_pb2.Empty, timeout=CHECK_TIMEOUT_S), CHECK_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise HostError(grpc.StatusCode.UNAVAILABLE,
                        f"agent did not answer Check within {CHECK_TIMEOUT_S:g} s") from None


async def _set_up_agent(pod: Pod, check: bool) -> None:
    """Check (unless the caller has seen the agent answer), then SetupSandbox."""
    began = time.monotonic()
    if check:
        await _check_agent(pod)
    checked = time.monotonic()
    request = sandbox_pb2.SetupSandboxRequest()
    request.config.CopyFrom(pod.options)
    try:
        await pod.agent.call(SANDBOX_SERVICE, "SetupSandbox", request, empty_pb2.Empty, timeout=SETUP_TIMEOUT_S)
    except ttrpc.RpcError as exc:  # the pod's config refused (e.g. a user namespace runc refuses)
        if exc.code != ttrpc.Code.INVALID_ARGUMENT:
            raise
        raise HostError(grpc.StatusCode.INVALID_ARGUMENT, f"pod {pod.id}: {exc.message}") from None
    pod.boot_info.update(setup_sandbox_s=f"{time.monotonic() - checked:.3f}",
                         **({"check_s": f"{checked - began:.3f}"} if check else {}))


async def _watch_vm(pod: Pod) -> None:
    """The VMM's exit ends the pod; so does the loss of what the running VM cannot do without,
    after which it is stopped: its vsock link (the hybrid backend process ended: the VM can never
    be reached again) or its virtiofsd (the containers' rootfs is gone; QEMU 7.2 cannot reconnect
    a vhost-user-fs device either)."""
    vm = pod.vm
    losses = {vm.transport.dead: "the VM's vsock link is gone"} if vm.transport.dead is not None else {}
    if vm.virtiofsd is not None and vm.virtiofsd.proc is not None:
        losses[asyncio.ensure_future(vm.virtiofsd.ended())] = \
            "the VM's virtiofsd ended, its shared directory (the containers' rootfs) is lost"
    try:
        await asyncio.wait({vm.exited, *losses}, return_when=asyncio.FIRST_COMPLETED)
        if not vm.exited.done():  # a VMM that dies takes its helpers along: wait to blame it
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(vm.exited), VMM_EXIT_GRACE_S)
    finally:
        for loss in losses:
            if loss is not vm.transport.dead:
                loss.cancel()
    if pod.stopping:
        return
    if vm.exited.done():
        status = vm.exited.result()
        pod.mark_exited(128 - status if status < 0 else status, vm.qemu.failure("the VMM died"))
    else:
        what, why = next((what, loss.result()) for loss, what in losses.items() if loss.done())
        pod.mark_exited(UNKNOWN_EXIT_STATUS, vm.qemu.failure(f"{what} ({why}); VM stopped"))
    await _close_vm(pod)


async def _unplug(pod: Pod) -> None:
    """Stop port-forwarding and give the pod's links back as the CNI made them (before the CNI
    deletes the netns)."""
    forwarder, pod.port_forward = pod.port_forward, None
    try:
        if forwarder is not None:
            await forwarder.close()
        elif pod_network.plugged(pod.dir):  # a rule an earlier daemon (or a failed start) left
            from host_sandboxer.portforward import remove_redirect
            await remove_redirect(pod.netns_path)
        await pod_network.unplug(pod.dir)
    except NetworkError as exc:
        raise HostError(grpc.StatusCode.INTERNAL, f"pod {pod.id}: {exc}") from None


async def _remove_cgroup(pod: Pod, strict: bool = False) -> None:
    """Remove the pod's cgroup, killing what is left in it. A cgroup that stays is the error
    when `strict` (Shutdown); while a start fails it is logged (the start's error is the story)."""
    if pod.cgroup is None:
        return
    try:
        await pod.cgroup.remove()
    except CgroupError as exc:
        if strict:
            raise HostError(grpc.StatusCode.INTERNAL, f"pod {pod.id}: {exc}") from None
        log.error("pod %s: %s", pod.id, exc)


async def _close_vm(pod: Pod) -> None:
    if pod.agent is not None:
        await pod.agent.close()
    if pod.vm is not None:
        await pod.vm.close()


async def _stop_containers(pod: Pod, timeout: float) -> None:
    """SIGTERM every container, wait up to `timeout` for them, then SIGKILL the rest."""
    async def call(method, request, response_type, call_timeout):
        with contextlib.suppress(ConnectionError, ttrpc.RpcError, HostError, asyncio.TimeoutError):
            await pod.agent_call(TASK_SERVICE, method, request, response_type, timeout=call_timeout)

    ids = list(pod.containers)
    if not ids:
        return
    for cid in ids:
        await call("Kill", task_v2.KillRequest(id=cid, signal=signal.SIGTERM, all=True), empty_pb2.Empty, 5)
    waits = [call("Wait", task_v2.WaitRequest(id=cid), task_v2.WaitResponse, None) for cid in ids]
    try:
        await asyncio.wait_for(asyncio.gather(*waits), timeout)
    except asyncio.TimeoutError:
        for cid in ids:
            await call("Kill", task_v2.KillRequest(id=cid, signal=signal.SIGKILL, all=True),
                       empty_pb2.Empty, 5)


async def stop(pod: Pod, timeout_s: float) -> None:
    """Stop the pod: its containers gracefully (forced after `timeout_s`), then the VM."""
    if pod.state == "ready" and not pod.vm_exited.done():
        await _stop_containers(pod, timeout_s or DEFAULT_STOP_TIMEOUT_S)
    pod.stopping = True
    await _close_vm(pod)
    await _unplug(pod)
    pod.mark_exited(0, "stopped")
    for task in pod.watchers:
        task.cancel()


async def shutdown(pod: Pod, task_relay) -> None:
    """Remove every file, mount and process of the pod (and its task address from `task_relay`)."""
    if not pod.vm_exited.done() and pod.state == "ready":
        await stop(pod, 1.0)
    pod.stopping = True
    await _close_vm(pod)  # a VM that ended by itself is closed by its watch, maybe still: wait for that
    pod.mark_exited(0, "shut down")  # a pod never started: release its Waits too
    for cid in list(pod.containers):
        await pod.remove_container(cid)
    await task_relay.unlisten(pod.id)
    await _unplug(pod)
    await _remove_cgroup(pod, strict=True)
    # Off the loop: the pod's tmpfs, freed by its unmount, holds what the guest wrote (bounded).
    space, left = pod.state_dir.mount_space, []
    try:
        if space.made:  # else no pod was started: nothing is mounted there
            left = await asyncio.to_thread(space.run, "teardown", str(pod.dir))
    except mounts.MountError as exc:
        left = [exc.strerror]
    # In the host's namespace too: a pod started by a daemon from before the pods' namespace.
    await asyncio.to_thread(mounts.unmount_all_under, pod.dir)
    left += mounts.mountpoints_under(pod.dir)
    if left:
        raise HostError(grpc.StatusCode.INTERNAL, f"pod {pod.id}: cannot unmount {', '.join(left)}")
    await asyncio.to_thread(pod.state_dir.remove_sandbox_dir, pod.id)

