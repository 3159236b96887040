"""Is a running pod's shared directory still served? A periodic probe through its agent.

A virtiofsd that dies is seen at once (the VM watch awaits its exit). One that hangs (stopped,
deadlocked) is alive and silent: the host sees nothing, while in the guest every access to the
containers' rootfs blocks. Only the guest can tell, so every `interval_s` the daemon asks the
agent (`vmmtask.v1.Health/Check` for "sharefs": a statfs of the mount, which always reaches the
server, bounded in the guest). While it is not answered the pod is unhealthy: Status says
SANDBOX_NOTREADY and, verbose, `unhealthy` = why (with virtiofsd's stopped processes when the
host can see them). It turns READY again once the server answers: a hung server may come back
(a SIGCONT), so the pod is not stopped; the orchestrator decides (kubelet replaces a sandbox
that stays NOTREADY).
"""

import asyncio
import logging

from host_sandboxer.vmm import process
from vmm_common import ttrpc
from vmm_common.capped_text import capped
from vmm_common.protos.vmmtask.v1 import health_pb2

log = logging.getLogger(__name__)

HEALTH_SERVICE = "vmmtask.v1.Health"
SHAREFS = "sharefs"
CALL_TIMEOUT_S = 10.0  # the agent bounds its statfs at 5 s; the rest is for a slow (TCG) guest
Serving = health_pb2.HealthCheckResponse


async def watch(pod, interval_s: float) -> None:
    """Probe while the pod's VM runs; `pod.unhealthy` follows the answers."""
    while not pod.vm_exited.done():
        await asyncio.sleep(interval_s)
        if pod.vm_exited.done():
            return
        try:
            reason = await _probe(pod)
        except ConnectionError:
            continue  # the link is the VM watch's business; no verdict on the share
        if reason is None:
            log.warning("pod %s: its agent cannot check the shared directory; not watched", pod.id)
            return
        if reason != pod.unhealthy:
            if reason:
                log.error("pod %s: unhealthy: %s", pod.id, reason)
            else:
                log.warning("pod %s: healthy again: the shared directory answers", pod.id)
        pod.unhealthy = reason


async def _probe(pod) -> str | None:
    """"" if the share answers; why not, in words; None if the agent knows no such check."""
    request = health_pb2.HealthCheckRequest(service=SHAREFS)
    try:
        answer = await asyncio.wait_for(
            pod.agent.call(HEALTH_SERVICE, "Check", request, Serving, timeout=CALL_TIMEOUT_S), CALL_TIMEOUT_S)
    except asyncio.TimeoutError:
        return _with_host_view(pod, f"the agent did not answer the shared-directory check within "
                                    f"{CALL_TIMEOUT_S:g} s")
    except ttrpc.RpcError as exc:
        return _with_host_view(pod, f"the shared-directory check failed: {exc.message}")
    if answer.status == Serving.SERVING:
        return ""
    if answer.status == Serving.SERVICE_UNKNOWN:
        return None
    return _with_host_view(pod, capped(answer.reason) or Serving.ServingStatus.Name(answer.status))


def _with_host_view(pod, reason: str) -> str:
    virtiofsd = pod.vm.virtiofsd if pod.vm is not None else None
    if virtiofsd is None or virtiofsd.proc is None:
        return reason
    halted = process.stopped(virtiofsd.proc.pid)
    if halted:
        reason += f" (virtiofsd is stopped on the host: pid {', '.join(map(str, halted))} in state T)"
    return reason
