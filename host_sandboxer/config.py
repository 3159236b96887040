"""vmm-sandboxer configuration: a TOML file mapped onto small dataclasses.

Every section is a dataclass whose field annotations are the schema: `load_config` rejects
unknown sections and keys, wrong types and values outside a `Literal`, naming the file, the
key and the problem.  Relative paths in a file are relative to that file's directory; the
defaults point at the image `make guest-image` writes (`build/guest/` in the repository).
To add a section, add a dataclass and a field of that type to `Config`.

Kuasar's names are accepted too: a `[hypervisor]` table (`path`, `kernel_path`, `initrd_path`,
`image_path`, `image`, `kernel_params`, `vcpus`, `memory_in_mb`, `share_fs`, `vsock`, `accel`,
`machine`, `template`) is folded
into the sections above before checking, so a Kuasar-style file works as it is.
"""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE_DIR = REPO_ROOT / "build" / "guest"
# QEMU 7.2's C virtiofsd (Debian 12: qemu-system-common), then the Rust one (Debian 13: the
# virtiofsd package, which also links the first path to it; QEMU 10 ships none). The first that
# exists is the default.
VIRTIOFSD_PATHS = (Path("/usr/lib/qemu/virtiofsd"), Path("/usr/libexec/virtiofsd"))


def default_virtiofsd() -> Path:
    return next((path for path in VIRTIOFSD_PATHS if path.is_file()), VIRTIOFSD_PATHS[0])


class ConfigError(ValueError):
    """The configuration file cannot be used; the message names the file and key."""


@dataclass
class VmConfig:
    """How each guest VM is launched."""

    qemu: str = "qemu-system-x86_64"
    machine: Literal["q35", "microvm"] = "q35"
    # auto: kvm only when hardware virtualisation really works (vmm/accel.py), else tcg.
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    cpus: int = 1
    # vCPUs a running pod may grow to through Controller.Update (CPU hotplug, q35), and the most
    # a pod's CPU limit gets; 0: no hotplug headroom, and at most the host's CPUs.
    max_cpus: int = 0
    memory_mib: int = 512
    # The most guest RAM a pod's memory limit gets (podconfig.py); 0: the host's RAM.
    max_memory_mib: int = 0
    kernel: Path = DEFAULT_IMAGE_DIR / "kernel"
    # What the guest boots from: "initrd" (unpacked into the guest's RAM) or "pmem" (`rootfs`,
    # a read-only erofs image on virtio-pmem mounted with DAX: one copy in the host's page cache
    # for every VM; q35 only). "auto": pmem on q35, initrd on microvm (`boot_image()`; pmem
    # chosen by measurement: docs/guest-image.md).
    image: Literal["auto", "initrd", "pmem"] = "auto"
    initrd: Path = DEFAULT_IMAGE_DIR / "initrd.img"
    rootfs: Path = DEFAULT_IMAGE_DIR / "rootfs.img"
    # virtio-balloon free page reporting: pages the guest frees return to the host.
    free_page_reporting: bool = True
    # Appended after the launcher's own parameters (console, task.*).
    kernel_params: str = ""
    # Seconds from QEMU start until the agent prints "vmm-task ready" (a clone: until it answers).
    boot_timeout_s: float = 30.0
    # Pods' VMs restored from a template (one per VM size, booted once and saved under the
    # state dir) instead of booted: q35, hybrid vsock and virtiofs only (docs/templates.md).
    template: bool = False


def boot_image(vm: VmConfig) -> str:
    """"initrd" or "pmem": what a guest launched with `vm` boots from."""
    if vm.image == "auto":
        return "pmem" if vm.machine == "q35" else "initrd"
    return vm.image


@dataclass
class SharefsConfig:
    """The directory shared with the guest under the tag `kuasar`."""

    type: Literal["virtiofs", "9p"] = "virtiofs"
    virtiofsd: Path = field(default_factory=default_virtiofsd)
    cache: Literal["auto", "always", "none"] = "auto"
    # How often the daemon asks each pod's guest whether the directory's server still answers
    # (a hung virtiofsd makes the pod NOTREADY until it does); 0: never.
    check_interval_s: float = 10.0
    # The pod's `mounts/` (what the guest can write in the shared directory: its containers'
    # bundle directories) is a tmpfs of this size and this many inodes (containment/pod_tmpfs.py).
    tmpfs_size_mib: int = 32
    tmpfs_inodes: int = 16384


@dataclass
class VsockConfig:
    """Host<->guest link: kernel vhost-vsock, hybrid (our vhost-user backend), or auto."""

    transport: Literal["auto", "kernel", "hybrid"] = "auto"


@dataclass
class AgentConfig:
    """What the launcher tells the guest agent (task.* kernel parameters) and where it listens."""

    port: int = 1024
    log_level: Literal["debug", "info", "warn", "error"] = "info"
    debug: bool = False


@dataclass
class ContainerdConfig:
    """Where the daemon publishes task events (containerd's gRPC socket); "" disables it."""

    address: str = "/run/containerd/containerd.sock"


@dataclass
class ContainmentConfig:
    """How the daemon confines the processes it runs for pods (docs/security.md)."""

    # QEMU and virtiofsd of a pod run in `<the pod's cgroup_parent>/vmm-<pod id>`; the vsock
    # backend and the stdio keepers in `<cgroup_parent below>/vmm-helpers`. false: everything
    # stays in the daemon's cgroup (a host without a writable cgroup filesystem).
    cgroups: bool = True
    # The parent of pods whose PodSandboxConfig names none: a path or a systemd slice name.
    cgroup_parent: str = "/vmm-sandboxer"
    # QEMU's seccomp filter (-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,
    # resourcecontrol=deny).
    seccomp: bool = True
    # A pod's QEMU runs as a uid (and gid) of its own from [vmm_uid_base, vmm_uid_base +
    # vmm_uids), without capabilities; no user of the host may have these ids. false: as root
    # without capabilities. QEMU serving 9p is root with the file capabilities 9p needs.
    vmm_user: bool = True
    vmm_uid_base: int = 2000000000
    vmm_uids: int = 65536
    # The vsock backend (every pod's hybrid vsock, one process) runs as backend_uid (and gid),
    # without capabilities: the daemon hands it every socket it serves. Outside the range above
    # (it maps every guest's RAM, as no single QEMU may); no user of the host may have it.
    # false: as root without capabilities.
    backend_user: bool = True
    backend_uid: int = 1999999999


@dataclass
class Config:
    vm: VmConfig = field(default_factory=VmConfig)
    sharefs: SharefsConfig = field(default_factory=SharefsConfig)
    vsock: VsockConfig = field(default_factory=VsockConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    containerd: ContainerdConfig = field(default_factory=ContainerdConfig)
    containment: ContainmentConfig = field(default_factory=ContainmentConfig)


def load_config(path: Path | str | None) -> Config:
    """Read `path` (None: all defaults) into a `Config`; raise ConfigError on any problem."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    config = _build(Config, _fold_kuasar_names(data, str(path)), str(path), "", path.resolve().parent)
    _check_containment(config.containment, str(path))
    if config.vm.image == "pmem" and config.vm.machine != "q35":
        raise ConfigError(f"{path}: vm.image = \"pmem\" needs vm.machine = \"q35\" "
                          f"(QEMU's virtio-pmem is a PCI device), not {config.vm.machine!r}")
    _check_template(config, str(path))
    return config


def _check_template(config: Config, file: str) -> None:
    """What a clone needs: PCIe root ports to hot-plug into, vhost-user devices QEMU can add."""
    if not config.vm.template:
        return
    needs = {"vm.machine": ("q35", config.vm.machine), "sharefs.type": ("virtiofs", config.sharefs.type)}
    if config.vsock.transport == "kernel":
        needs["vsock.transport"] = ("hybrid", "kernel")
    for key, (wanted, value) in needs.items():
        if value != wanted:
            raise ConfigError(f"{file}: vm.template = true needs {key} = {wanted!r}, not {value!r} "
                              "(a clone's devices are hot-plugged after the restore: docs/templates.md)")


def _check_containment(containment: ContainmentConfig, file: str) -> None:
    """What one key's type cannot say: a cgroup parent that stays in the hierarchy, a uid range
    that fits."""
    from host_sandboxer.containment.cgroups import CgroupError, expand_parent
    from host_sandboxer.containment.uids import UID_MAX, UidRange, UidRangeError
    try:
        expand_parent(containment.cgroup_parent)
        uids = UidRange(containment.vmm_uid_base, containment.vmm_uids)
        if containment.backend_uid in uids or containment.backend_uid > UID_MAX:
            raise UidRangeError(f"backend_uid {containment.backend_uid} must lie within [1, {UID_MAX}] "
                                "and outside the vmm uid range")
    except (CgroupError, UidRangeError) as e:
        raise ConfigError(f"{file}: [containment] {e}") from None


# Kuasar's `[hypervisor]` key -> (our section, our key).
KUASAR_HYPERVISOR_KEYS = {
    "path": ("vm", "qemu"),
    "kernel_path": ("vm", "kernel"),
    "initrd_path": ("vm", "initrd"),
    "image_path": ("vm", "rootfs"),
    "image": ("vm", "image"),
    "kernel_params": ("vm", "kernel_params"),
    "vcpus": ("vm", "cpus"),
    "memory_in_mb": ("vm", "memory_mib"),
    "accel": ("vm", "accel"),
    "machine": ("vm", "machine"),
    "template": ("vm", "template"),
    "share_fs": ("sharefs", "type"),
    "vsock": ("vsock", "transport"),
}


def _fold_kuasar_names(data: dict, file: str) -> dict:
    """Move a Kuasar-style `[hypervisor]` table's keys into our sections (a key given both ways
    is an error, so the file cannot mean two things)."""
    hypervisor = data.get("hypervisor")
    if hypervisor is None:
        return data
    if not isinstance(hypervisor, dict):
        raise ConfigError(f"{file}: hypervisor must be a table")
    unknown = sorted(set(hypervisor) - set(KUASAR_HYPERVISOR_KEYS))
    if unknown:
        raise ConfigError(f"{file}: unknown key(s) in [hypervisor]: {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(KUASAR_HYPERVISOR_KEYS))}")
    folded = {key: dict(value) if isinstance(value, dict) else value
              for key, value in data.items() if key != "hypervisor"}
    for key, value in hypervisor.items():
        section, name = KUASAR_HYPERVISOR_KEYS[key]
        table = folded.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{file}: {section} must be a table")
        if name in table:
            raise ConfigError(f"{file}: hypervisor.{key} and {section}.{name} both set the same thing")
        table[name] = value
    return folded


def _build(cls, table: dict, file: str, prefix: str, base: Path):
    """Make dataclass `cls` from a TOML table, checking keys and value types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - names)
    if unknown:
        where = f"[{prefix.rstrip('.')}]" if prefix else "top level"
        raise ConfigError(f"{file}: unknown key(s) in {where}: {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(names))}")
    return cls(**{key: _convert(hints[key], value, file, prefix + key, base)
                  for key, value in table.items()})


def _convert(kind, value, file: str, key: str, base: Path):
    """Check one value against its annotation and convert it (paths resolved against `base`)."""
    def bad(rule: str) -> ConfigError:
        return ConfigError(f"{file}: {key} = {value!r}: {rule}")

    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise bad("must be a table")
        return _build(kind, value, file, key + ".", base)
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise bad(f"must be one of {', '.join(map(repr, choices))}")
        return value
    if kind is Path:
        if not isinstance(value, str) or not value:
            raise bad("must be a non-empty path string")
        return base / Path(value).expanduser()
    if kind is bool:
        if not isinstance(value, bool):
            raise bad("must be true or false")
        return value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value <= 0:
            raise bad(f"must be a positive {'integer' if kind is int else 'number'}")
        return kind(value)
    if kind is str:
        if not isinstance(value, str):
            raise bad("must be a string")
        return value
    raise TypeError(f"config schema: unsupported annotation {kind!r} for {key}")
