"""`task.preload` (a VM template's guest only: docs/templates.md): before the ready line, import
what the agent otherwise imports on a pod's first calls, so that every clone restored from the
template has it loaded already. Under TCG these imports are most of a clone's pod start
(pyroute2 alone: ~145 modules as bytecode); a cold boot, without the parameter, imports them on
first use as before.

Only modules: no socket, process, file or pod state is made here, so a clone inherits nothing
but code and constants (pyroute2's import opens no netlink socket; its `random` module's state is
reseeded per pod at SetupSandbox: vmm_task.pod.entropy.reseed_python)."""

import logging
import time

log = logging.getLogger(__name__)


def import_pod_modules() -> float:
    """Import them (PID 1's start-up: the collector is off, and what is loaded here is frozen
    out of later collections with the rest: vmm_task.server._settle_gc); the seconds it took."""
    started = time.monotonic()
    # SetupSandbox: the pod's namespaces, files and CRNG reseed; its network (pyroute2)
    import pyroute2.iproute  # noqa: F401
    import vmm_task.netlink.links  # noqa: F401
    import vmm_task.netlink.routes  # noqa: F401
    import vmm_task.pod.entropy  # noqa: F401
    import vmm_task.pod.setup  # noqa: F401
    import vmm_common.protos.vmmtask.v1.podconfig_pb2  # noqa: F401  (the CRI config's decoder)
    # The Task service (containerd's first Task call) and the container layer behind it
    import vmm_task.container.ids  # noqa: F401
    import vmm_task.container.mounts  # noqa: F401
    import vmm_task.container.options  # noqa: F401
    import vmm_task.container.runtime  # noqa: F401
    import vmm_task.container.stdio  # noqa: F401
    import vmm_task.container.table  # noqa: F401
    import vmm_task.kuasar.convention  # noqa: F401
    import vmm_task.kuasar.storages  # noqa: F401
    import vmm_task.kuasar.virtio_ports  # noqa: F401
    import vmm_task.services.streaming  # noqa: F401
    import vmm_task.services.task  # noqa: F401
    # The host's first port-forward connection
    import vmm_task.portforward  # noqa: F401
    took = time.monotonic() - started
    log.info("boot: task.preload: a pod's modules imported in %.3f s", took)
    return took
