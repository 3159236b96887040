"""The QEMU command line for one guest, built from a `VmSpec` (pure: no I/O, unit-tested).

Devices are named as virtio-pci (`...-pci`, also in the vsock transport's `qemu_args()`); on
microvm, which has no PCI bus, each becomes its virtio-mmio twin (`...-device`).  Guest RAM is
always a shared memfd: vhost-user devices (hybrid vsock, virtiofs) read and write it from
another process.  See docs/qemu.md for the choices and what they cost at boot.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

SHARE_TAG = "kuasar"
MIB = 1 << 20
SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@dataclass(frozen=True)
class VirtiofsShare:
    """vhost-user-fs served by virtiofsd listening on `socket_path`; `fd`: a connection to it
    made for QEMU (vmm/qemu_fds.py)."""

    socket_path: Path
    fd: int | None = None


@dataclass(frozen=True)
class NinePShare:
    """virtio-9p served by QEMU itself from `directory`."""

    directory: Path


ShareDevice = Union[VirtiofsShare, NinePShare]


@dataclass(frozen=True)
class TapNic:
    """virtio-net on a tap QEMU inherits as open fds (one per queue: multi-queue when > 1);
    `mac` is the guest's MAC (host_sandboxer.network makes these)."""

    id: str
    mac: str
    fds: tuple[int, ...]


@dataclass(frozen=True)
class PmemRoot:
    """The guest's root file system: a read-only erofs image (initrd/rootfs_image.py) on
    virtio-pmem, mounted with DAX, in place of an initrd. QEMU maps the file read-only and shared,
    so its pages are the host's page cache, one copy for every VM. virtio-pmem is a PCI memory
    device: q35 only, with a memory slot and `maxmem` room for it."""

    image: Path
    size: int  # bytes, a multiple of 2 MiB


# A template's (and so every clone's) spare PCIe root ports: a clone hot-plugs its pod's devices
# there (q35's root bus takes no hot-plug; ACPI PCI hot-plug on root ports is QEMU 7.2's default).
HOTPLUG_VSOCK_PORT, HOTPLUG_FS_PORT = "hp-vsock", "hp-fs"
HOTPLUG_NIC_PORTS = ("hp-net0", "hp-net1", "hp-net2", "hp-net3")


# The kernel sizes its dentry, inode and TCP hash tables from the guest's RAM (for 512 MiB: 65536,
# 32768 and 4096 buckets, 512 + 256 + 160 kB with TCP's bind table, all written at boot and so
# resident in every guest); a pod's guest holds a few thousand dentries and connections
# (docs/host-memory.md).
HASH_TABLE_PARAMS = ("dhash_entries=8192", "ihash_entries=4096", "thash_entries=1024")
PMEM_ROOT_PARAMS = ("root=/dev/pmem0", "rootfstype=erofs", "rootflags=dax=always", "ro", "rootwait",
                    "init=/init")


@dataclass(frozen=True)
class VmSpec:
    kernel: Path
    initrd: Path | None  # None with `root`
    console_socket: Path  # QEMU listens on these two, so a restarted daemon connects again
    qmp_socket: Path
    console_fd: int | None = None  # the two listening sockets, made for QEMU (vmm/qemu_fds.py)
    qmp_fd: int | None = None
    inherited_fds: tuple[int, ...] = ()  # every fd QEMU inherits but the taps' (`pass_fds`)
    vsock_args: tuple[str, ...] = ()  # from the vsock transport's qemu_args()
    share: ShareDevice | None = None
    nics: tuple[TapNic, ...] = ()  # their fds must be passed to QEMU (`pass_fds`)
    kernel_params: tuple[str, ...] = ()
    qemu: str = "qemu-system-x86_64"
    machine: Literal["q35", "microvm"] = "q35"
    accel: Literal["kvm", "tcg"] = "tcg"
    cpus: int = 1
    max_cpus: int = 0  # vCPUs it may grow to by hotplug (`-smp N,maxcpus=M`); <= cpus: none
    memory_mib: int = 512
    tsc_khz: int | None = None  # the host's TSC rate; handed to a microvm guest under TCG
    name: str = "vmm-task"
    # QEMU's seccomp filter: no obsolete system calls, no set*uid, no fork/exec, no changes to
    # scheduling, affinity or limits (docs/security.md).
    seccomp: bool = False
    root: PmemRoot | None = None
    # virtio-balloon with free page reporting: pages the guest frees go back to the host.
    free_page_reporting: bool = False
    # Guest RAM in this file (memory-backend-file, shared) instead of an anonymous memfd: a
    # template's RAM outlives its QEMU and each clone maps a copy of its own (docs/templates.md).
    ram_file: Path | None = None
    # Wait for the machine state from QMP `migrate-incoming` (a template's clone) instead of booting.
    incoming: bool = False
    # A template or its clone: spare root ports for the per-pod devices, and vmgenid, whose new
    # generation ID on each restore makes the guest kernel reseed its CRNG (docs/templates.md).
    clonable: bool = False
    # Appended as they are: devices another host's layout has (the VM tests build Kuasar's
    # virtio-serial bus and pci-bridge for what they hot-plug, tests/vm/test_kuasar_vm.py).
    extra_args: tuple[str, ...] = ()


def build_argv(spec: VmSpec) -> list[str]:
    """The full argv (argv[0] = the QEMU binary) for `spec`."""
    if (spec.root is None) == (spec.initrd is None):
        raise ValueError("a VM boots from an initrd or from a pmem root image, exactly one")
    if spec.clonable and spec.machine != "q35":
        raise ValueError(f"a template needs machine q35 (its clones hot-plug into PCIe root ports), not {spec.machine}")
    if spec.root is not None and spec.machine != "q35":
        raise ValueError(f"a pmem root image needs machine q35 (virtio-pmem is PCI), not {spec.machine}")
    argv = [
        spec.qemu,
        "-name", spec.name,
        "-machine", _machine(spec),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        *(("-sandbox", SECCOMP) if spec.seccomp else ()),
        "-smp", f"{spec.cpus},maxcpus={spec.max_cpus}" if spec.max_cpus > spec.cpus else str(spec.cpus),
        "-m", _memory(spec),
        "-object", _ram_backend(spec),
    ]
    if spec.accel == "kvm":
        argv += ["-cpu", "host"]
    argv += [
        "-kernel", str(spec.kernel),
        *(("-initrd", str(spec.initrd)) if spec.initrd is not None else ()),
        "-append", " ".join(kernel_params(spec)),
        # QEMU serves console and QMP (one client each, replaced when it goes): the daemon
        # connects, and a restarted daemon connects again. -S: the guest runs once the daemon
        # reads the console (QMP `cont`), so no boot line is lost.
        "-chardev", f"socket,id=console,{_where(spec.console_socket, spec.console_fd)},server=on,wait=off",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=qmp,{_where(spec.qmp_socket, spec.qmp_fd)},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control", "-S",
        # Entropy from the host: without it the guest's CRNG is not ready when /init starts
        # and the agent's interpreter cannot seed its hash randomisation.
        "-object", "rng-random,id=rng,filename=/dev/urandom",
        "-device", "virtio-rng-pci,rng=rng",
    ]
    argv += _root_args(spec.root) + _balloon_args(spec.free_page_reporting)
    argv += list(spec.vsock_args) + _share_args(spec.share) + _nic_args(spec.nics, spec.machine)
    argv += _clonable_args() if spec.clonable else []
    argv += list(spec.extra_args)
    if spec.incoming:
        argv += ["-incoming", "defer"]
    return argv if spec.machine == "q35" else _virtio_mmio(argv)


def kernel_params(spec: VmSpec) -> list[str]:
    """console on the first serial port; a panic (PID 1 dying) ends QEMU via -no-reboot."""
    params = ["console=ttyS0", "panic=-1", *HASH_TABLE_PARAMS]
    if spec.machine == "microvm" and spec.accel == "tcg" and spec.tsc_khz:
        # microvm has no HPET or ACPI PM timer to calibrate the TSC against; under TCG on a busy
        # host the PIT calibration fails and boot stalls (docs/qemu.md).  KVM has kvmclock.
        params.append(f"tsc_early_khz={spec.tsc_khz}")
    if spec.root is not None:
        params += PMEM_ROOT_PARAMS
    if spec.share is not None:
        params.append("task.sharefs_type=" + ("virtiofs" if isinstance(spec.share, VirtiofsShare) else "9p"))
    return params + list(spec.kernel_params)


def _machine(spec: VmSpec) -> str:
    # memory-backend= puts all RAM in the shared memfd without a NUMA node (microvm has no NUMA).
    # microvm keeps its default PIC/PIT/RTC: measured, pit=off stalls boot under TCG and
    # rtc=off costs ~1 s (docs/qemu.md). q35 without its built-in AHCI controller, for which
    # the guest kernel has no driver: 1.6 MB less anonymous memory per QEMU (docs/host-memory.md).
    machine = f"{spec.machine},accel={spec.accel},memory-backend=mem"
    return machine + ",sata=off" if spec.machine == "q35" else machine


def _memory(spec: VmSpec) -> str:
    """-m: the RAM, and with a pmem root one slot and its size on top (QEMU places memory
    devices in the room between RAM and maxmem)."""
    if spec.root is None:
        return f"{spec.memory_mib}M"
    return f"{spec.memory_mib}M,slots=1,maxmem={spec.memory_mib + -(-spec.root.size // MIB)}M"


def _root_args(root: PmemRoot | None) -> list[str]:
    if root is None:
        return []
    return ["-object", f"memory-backend-file,id=rootfs,mem-path={_opt(root.image)},size={root.size},"
                       "share=on,readonly=on",
            "-device", "virtio-pmem-pci,memdev=rootfs,id=rootfs"]


def _clonable_args() -> list[str]:
    ports = (HOTPLUG_VSOCK_PORT, HOTPLUG_FS_PORT, *HOTPLUG_NIC_PORTS)
    return [arg for slot, port in enumerate(ports, 1)
            for arg in ("-device", f"pcie-root-port,id={port},chassis={slot},slot={slot}")] \
        + ["-device", "vmgenid,guid=auto"]


def _balloon_args(free_page_reporting: bool) -> list[str]:
    return ["-device", "virtio-balloon-pci,id=balloon,free-page-reporting=on"] if free_page_reporting else []


def _ram_backend(spec: VmSpec) -> str:
    if spec.ram_file is None:
        return f"memory-backend-memfd,id=mem,size={spec.memory_mib}M,share=on"
    return f"memory-backend-file,id=mem,size={spec.memory_mib}M,mem-path={_opt(spec.ram_file)},share=on"


def _share_args(share: ShareDevice | None) -> list[str]:
    if share is None:
        return []
    if isinstance(share, VirtiofsShare):
        return ["-chardev", f"socket,id=fs,{_where(share.socket_path, share.fd)}",
                "-device", f"vhost-user-fs-pci,chardev=fs,tag={SHARE_TAG}"]
    return ["-fsdev", f"local,id=fs,path={_opt(share.directory)},security_model=none",
            "-device", f"virtio-9p-pci,fsdev=fs,mount_tag={SHARE_TAG}"]


def nic_properties(nic: TapNic, machine: str) -> dict:
    """virtio-net's properties for `nic` (on the command line, or hot-plugged by QMP)."""
    props = {"netdev": nic.id, "mac": nic.mac}
    if len(nic.fds) > 1:
        props["mq"] = True
        if machine == "q35":  # MSI-X: one vector per queue each way, + config + control
            props["vectors"] = 2 * len(nic.fds) + 2
    if machine == "q35":  # no PXE option ROM (the kernel is loaded directly): 256 kB per NIC
        props["romfile"] = ""
    return props


def _nic_args(nics: tuple[TapNic, ...], machine: str) -> list[str]:
    args = []
    for nic in nics:
        fds = ":".join(map(str, nic.fds))
        props = ",".join(f"{k}={'on' if v is True else v}" for k, v in nic_properties(nic, machine).items())
        args += ["-netdev", f"tap,id={nic.id},{'fds' if len(nic.fds) > 1 else 'fd'}={fds}",
                 "-device", f"virtio-net-pci,{props}"]
    return args


def pass_fds(spec: VmSpec) -> list[int]:
    """The fds QEMU must inherit at the same numbers."""
    return [fd for nic in spec.nics for fd in nic.fds] + list(spec.inherited_fds)


def _virtio_mmio(argv: list[str]) -> list[str]:
    """Each `-device X-pci,...` as `-device X-device,...` (QEMU's virtio-mmio naming)."""
    out = list(argv)
    for i in range(1, len(out)):
        if out[i - 1] == "-device":
            driver, sep, opts = out[i].partition(",")
            if driver.endswith("-pci"):
                out[i] = driver[:-len("-pci")] + "-device" + sep + opts
    return out


def _where(path: Path, fd: int | None) -> str:
    """A socket chardev's address: the fd made for QEMU, else the path it opens."""
    return f"fd={fd}" if fd is not None else f"path={_opt(path)}"


def _opt(path: Path) -> str:
    """A path as a QEMU option value: commas are escaped by doubling."""
    return str(path).replace(",", ",,")
