"""Rewrite a container's OCI spec from containerd's host view into the guest's view.

containerd writes a config.json for a host runtime: namespace paths of the host
(`/proc/<pid>/ns/ipc`), a host cgroupsPath, bind-mount sources on the host. Inside the VM
none of that exists. The pod's namespaces live in the guest (made by SetupSandbox), the
network is the VM's own, and host files reach the guest only through the shared directory.
This module is pure: it returns the new spec and the list of host paths the caller must
expose in the shared directory; it touches no file.
"""

import copy
import posixpath
from dataclasses import dataclass

GUEST_SHARED_DIR = "/run/kuasar/state"
ROOTFS_DIR = "rootfs"
CGROUP_PARENT = "/vmm-task"

# Namespaces containers of a pod share inside the guest (joined by path when the host spec
# names a path for them); the VM itself is the pod's network namespace.
POD_NAMESPACES = ("ipc", "uts", "pid")
VM_NAMESPACES = ("network",)


class SpecError(ValueError):
    """The spec cannot be run inside the VM (the message says why)."""


@dataclass(frozen=True)
class Exposure:
    """A host path to bind into the shared directory at `shared_path` (relative to it)."""

    host_source: str
    shared_path: str
    options: tuple[str, ...]
    destination: str = ""


@dataclass(frozen=True)
class RewrittenSpec:
    spec: dict
    exposures: list[Exposure]


# Pod files CRI binds from its sandbox directory. A sandboxer other than CRI's own may get
# them without CRI having made the files; then the guest's own take their place: the agent's
# hosts/resolv.conf/hostname and a tmpfs /dev/shm.
POD_FILE_DESTINATIONS = ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf")
SHM = {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
       "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}


def drop_missing_pod_files(spec: dict, missing: list[Exposure]) -> list[Exposure]:
    """Remove from `spec` the binds of CRI pod files whose host source is missing (a tmpfs for
    /dev/shm); return the exposures that cannot be dropped (a real missing source)."""
    keep = []
    for exposure in missing:
        guest_source = posixpath.join(GUEST_SHARED_DIR, exposure.shared_path)
        if exposure.destination not in POD_FILE_DESTINATIONS + ("/dev/shm",):
            keep.append(exposure)
            continue
        mounts = spec["mounts"]
        index = next(i for i, m in enumerate(mounts) if m.get("source") == guest_source)
        if exposure.destination == "/dev/shm":
            mounts[index] = dict(SHM)
        else:
            del mounts[index]
    return keep


def reopen_submounts(spec: dict, exposure: Exposure, submounts: list[str]) -> None:
    """Give each of `submounts` (paths relative to the bind source, parents first) of a `ro`
    bind a bind of its own in `spec`, right after that bind's, with `ro` made `rw`.

    OCI's `ro` makes only the top of a bind read-only: on a host, its submounts keep their own
    flags (critest's "non-recursive readonly mounts" writes into one). In the guest the whole
    volume is one virtiofs or 9p mount, so crun's `ro` would cover the submounts too. Their
    own binds there leave the decision to the host's copy of each, as runc would."""
    guest_source = posixpath.join(GUEST_SHARED_DIR, exposure.shared_path)
    mounts = spec["mounts"]
    index = next(i for i, m in enumerate(mounts) if m.get("source") == guest_source)
    options = ["rw" if o == "ro" else o for o in mounts[index].get("options") or ()]
    mounts[index + 1:index + 1] = [
        {"destination": posixpath.join(exposure.destination, sub), "type": "bind",
         "source": posixpath.join(guest_source, sub), "options": list(options)} for sub in submounts]


def guest_bundle(container_id: str) -> str:
    return posixpath.join(GUEST_SHARED_DIR, container_id)


def guest_cgroups_path(container_id: str) -> str:
    return posixpath.join(CGROUP_PARENT, container_id)


def rewrite_spec(spec: dict, container_id: str, pod_namespaces: dict[str, str | None]) -> RewrittenSpec:
    """Return the guest's spec for `container_id` and the host paths it needs exposed.

    `pod_namespaces` maps "ipc"/"uts"/"pid" to the guest path of the pod's namespace (None
    when the pod has no such shared namespace, e.g. no shared PID namespace).
    """
    if not isinstance(spec, dict):
        raise SpecError("config.json is not a JSON object")
    out = copy.deepcopy(spec)
    root = out.setdefault("root", {})
    if not isinstance(root, dict):
        raise SpecError("spec root is not an object")
    root["path"] = ROOTFS_DIR
    process = out.get("process")
    if isinstance(process, dict):
        # No AppArmor/SELinux in the guest kernel; host profiles would make crun fail.
        process.pop("apparmorProfile", None)
        process.pop("selinuxLabel", None)
    # Hooks name host binaries; they cannot run inside the VM.
    out.pop("hooks", None)
    linux = out.get("linux")
    if isinstance(linux, dict):
        _rewrite_linux(linux, container_id, pod_namespaces)
    exposures = _rewrite_mounts(out, container_id)
    return RewrittenSpec(out, exposures)


def _rewrite_linux(linux: dict, container_id: str, pod_namespaces: dict[str, str | None]) -> None:
    linux["cgroupsPath"] = guest_cgroups_path(container_id)
    linux.pop("mountLabel", None)
    cpu = (linux.get("resources") or {}).get("cpu")
    if isinstance(cpu, dict):
        # Host CPU and memory-node sets mean nothing for the guest's vCPUs.
        cpu.pop("cpus", None)
        cpu.pop("mems", None)
    namespaces = []
    for ns in linux.get("namespaces") or []:
        if not isinstance(ns, dict) or not isinstance(ns.get("type"), str):
            raise SpecError(f"malformed namespace entry {ns!r}")
        kind, path = ns["type"], ns.get("path") or ""
        if kind in VM_NAMESPACES:
            continue
        if not path:
            namespaces.append({"type": kind})
            continue
        if kind not in POD_NAMESPACES:
            raise SpecError(f"cannot join the host {kind} namespace {path!r} inside a VM")
        guest_path = pod_namespaces.get(kind)
        if not guest_path:
            raise SpecError(f"the spec joins a pod {kind} namespace ({path!r}) but the pod has none")
        namespaces.append({"type": kind, "path": guest_path})
    linux["namespaces"] = namespaces


def _is_bind(mount: dict) -> bool:
    options = mount.get("options") or []
    return mount.get("type") == "bind" or "bind" in options or "rbind" in options


def _rewrite_mounts(spec: dict, container_id: str) -> list[Exposure]:
    exposures = []
    for index, mount in enumerate(spec.get("mounts") or []):
        if not isinstance(mount, dict):
            raise SpecError(f"malformed mount entry {mount!r}")
        if not _is_bind(mount):
            continue
        source = mount.get("source")
        if not isinstance(source, str) or not posixpath.isabs(source):
            raise SpecError(f"bind mount to {mount.get('destination')!r} has no absolute source")
        shared_path = posixpath.join(container_id, "mounts", str(index))
        exposures.append(Exposure(source, shared_path, tuple(mount.get("options") or ()),
                                  mount.get("destination") or ""))
        mount["source"] = posixpath.join(GUEST_SHARED_DIR, shared_path)
    return exposures
