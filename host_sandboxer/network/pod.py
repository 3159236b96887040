"""Pod networking as the sandbox lifecycle uses it: plug before QEMU boots, describe the
network to the agent once it answers, unplug at Stop/Shutdown (also for a pod recovered after a
daemon crash: only the record file in the pod's directory is needed)."""
from __future__ import annotations

from pathlib import Path

from google.protobuf import empty_pb2

from host_sandboxer.network.messages import interfaces_request, routes_request
from host_sandboxer.network.plumbing import Attachment, attach, detach

RECORD = "network.json"
SANDBOX_SERVICE = "grpc.SandboxService"


async def plug(pod_dir: Path, netns_path: str, vcpus: int) -> Attachment | None:
    """Taps for every link of the pod namespace, one queue per vCPU; None for a host-network
    pod (no namespace). NetworkError, with nothing left behind, if it cannot be done."""
    if not netns_path:
        return None
    return await attach(netns_path, max(1, vcpus), pod_dir / RECORD)


async def configure_guest(call, attachment: Attachment, timeout: float) -> None:
    """Addresses/MTU by MAC, then routes; `call(service, method, request, response_type,
    timeout=)` is the pod's agent call."""
    await call(SANDBOX_SERVICE, "UpdateInterfaces", interfaces_request(attachment.network),
               empty_pb2.Empty, timeout=timeout)
    await call(SANDBOX_SERVICE, "UpdateRoutes", routes_request(attachment.network),
               empty_pb2.Empty, timeout=timeout)


async def unplug(pod_dir: Path) -> None:
    """Remove whatever plug made (idempotent; nothing recorded, nothing to do)."""
    await detach(pod_dir / RECORD)
