"""SetupSandbox's work: validate the pod config (its user namespace options as a runc pod's:
vmm_common/userns.py), make the pod namespaces, apply sysctls, write hosts/resolv.conf, and record it all in
`ctx.sandbox` for the Task service."""

import logging
import os

from vmm_common import userns
from vmm_task.pod import files
from vmm_task.pod.namespaces import PodNamespaces
from vmm_task.pod.podconfig import PodConfig, decode

log = logging.getLogger(__name__)
MAX_HOSTNAME = 64
_HOSTNAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")


class HostProtected(Exception):
    """Dev mode: the request would change the host's kernel state."""


def decode_config(type_url: str, value: bytes) -> PodConfig:
    """Decode and validate; ValueError (PodConfigError) with the problem otherwise."""
    config = decode(type_url, value)
    if len(config.hostname) > MAX_HOSTNAME or not set(config.hostname) <= _HOSTNAME_CHARS:
        raise ValueError(f"invalid hostname {config.hostname!r}")
    for name in config.sysctls:
        files.sysctl_path(name)  # raises ValueError for a name that could leave /proc/sys
    userns.check(config.userns)
    return config


async def setup_pod(ctx, config: PodConfig) -> PodNamespaces:
    """Namespaces and sysctls. IPC sysctls go inside the pod's IPC namespace; the others are
    global, which in the VM is the pod's own kernel and in dev mode the host's (refused).
    Raises ValueError for a sysctl that does not exist or refuses its value, HostProtected,
    or OSError; nothing is left behind when it raises."""
    ipc = {k: v for k, v in config.sysctls.items() if files.is_ipc_sysctl(k)}
    others = {k: v for k, v in config.sysctls.items() if k not in ipc}
    if others and ctx.dev_mode:
        raise HostProtected(f"dev mode: sysctls {', '.join(sorted(others))} are not namespaced "
                            "and would change the host")
    namespaces = PodNamespaces(os.path.join(ctx.run_dir, "sandbox-ns"), ctx.pod_pause)
    namespaces.create(config.hostname, ipc, config.share_pid)
    try:
        for name, value in others.items():
            files.write_sysctl(name, value)
    except BaseException:
        namespaces.destroy()
        raise
    ctx.cleanups.append(namespaces.destroy)
    sandbox = ctx.sandbox
    sandbox.hostname = config.hostname
    sandbox.namespaces = {"ipc": namespaces.paths["ipc"], "uts": namespaces.paths["uts"],
                          "pid": namespaces.paths.get("pid")}
    sandbox.holder_pid = namespaces.holder_pid
    return namespaces


def undo_pod(ctx, namespaces: PodNamespaces) -> None:
    """Forget a pod setup that failed after setup_pod, so SetupSandbox can be tried again."""
    namespaces.destroy()
    ctx.cleanups.remove(namespaces.destroy)
    ctx.sandbox.reset()


def write_pod_files(ctx, config: PodConfig, addresses: list[str]) -> None:
    """hosts and resolv.conf for the containers. Without DNS in the config, a resolv.conf (or
    hosts) the host put in the shared directory is used, as Kuasar's host provides it."""
    directory = os.path.join(ctx.run_dir, "pod")
    os.makedirs(directory, mode=0o755, exist_ok=True)
    sandbox = ctx.sandbox
    shared_resolv = os.path.join(ctx.state_dir, "resolv.conf")
    if config.has_dns:
        sandbox.resolv_path = os.path.join(directory, "resolv.conf")
        files.write_atomic(sandbox.resolv_path, files.resolv_conf(config))
    elif os.path.exists(shared_resolv):
        sandbox.resolv_path = shared_resolv
    shared_hosts = os.path.join(ctx.state_dir, "hosts")
    if os.path.exists(shared_hosts):
        sandbox.hosts_path = shared_hosts
    else:
        sandbox.hosts_path = os.path.join(directory, "hosts")
        files.write_atomic(sandbox.hosts_path, files.hosts(config.hostname, addresses))
