"""Pod networking as the sandbox lifecycle uses it: plug before QEMU boots, describe the
network to the agent once it answers, unplug at Stop/Shutdown (also for a pod recovered after a
daemon crash: only the record file in the pod's directory is needed)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf import empty_pb2

from host_sandboxer.network.messages import interfaces_request, routes_request
from vmm_common.protos import SANDBOX_SERVICE

if TYPE_CHECKING:
    from host_sandboxer.network.plumbing import Attachment

log = logging.getLogger(__name__)
RECORD = "network.json"
# The agent imports pyroute2 on its first network call: 5-7 s under TCG on a loaded 2-core host.
GUEST_TIMEOUT_S = 60.0


async def plug(pod_dir: Path, netns_path: str, vcpus: int) -> Attachment | None:
    """Taps for every link of the pod namespace, one queue per vCPU; None for a host-network
    pod (no namespace). NetworkError, with nothing left behind, if it cannot be done."""
    if not netns_path:
        return None
    # pyroute2 (~10 MB of the daemon's PSS) is imported only by pods that have a netns.
    from host_sandboxer.network.plumbing import attach
    return await attach(netns_path, max(1, vcpus), pod_dir / RECORD)


async def configure_guest(call, attachment: Attachment, timeout: float = GUEST_TIMEOUT_S) -> None:
    """Addresses/MTU by MAC, then routes; `call(service, method, request, response_type,
    timeout=)` is the pod's agent call."""
    started = time.monotonic()
    await call(SANDBOX_SERVICE, "UpdateInterfaces", interfaces_request(attachment.network),
               empty_pb2.Empty, timeout=timeout)
    await call(SANDBOX_SERVICE, "UpdateRoutes", routes_request(attachment.network),
               empty_pb2.Empty, timeout=timeout)
    log.info("guest network configured in %.2f s: %s", time.monotonic() - started,
             ", ".join(f"{link.name} {link.mac}" for link in attachment.network.links))


def plugged(pod_dir: Path) -> bool:
    """Whether plug made something that unplug has not removed yet."""
    return (pod_dir / RECORD).exists()


async def unplug(pod_dir: Path) -> None:
    """Remove whatever plug made (idempotent; nothing recorded, nothing to do)."""
    record = pod_dir / RECORD
    if not plugged(pod_dir):  # a host-network pod: no need to load pyroute2
        return
    from host_sandboxer.network.plumbing import detach
    await detach(record)
