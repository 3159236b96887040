"""The QEMU command line for one guest, built from a `VmSpec` (pure: no I/O, unit-tested).

Devices are virtio-pci on q35 and virtio-mmio on microvm (the same device with a `-device`
suffix instead of `-pci`).  Guest RAM is always a shared memfd: vhost-user devices (hybrid
vsock, virtiofs) read and write it from another process.  See docs/qemu.md for the choices
and what they cost at boot.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

SHARE_TAG = "kuasar"


@dataclass(frozen=True)
class HybridVsock:
    """vhost-user-vsock served by our backend listening on `socket_path`."""

    socket_path: Path


@dataclass(frozen=True)
class KernelVsock:
    """vhost-vsock through the host kernel's /dev/vhost-vsock."""

    guest_cid: int


@dataclass(frozen=True)
class VirtiofsShare:
    """vhost-user-fs served by virtiofsd listening on `socket_path`."""

    socket_path: Path


@dataclass(frozen=True)
class NinePShare:
    """virtio-9p served by QEMU itself from `directory`."""

    directory: Path


VsockDevice = Union[HybridVsock, KernelVsock]
ShareDevice = Union[VirtiofsShare, NinePShare]


@dataclass(frozen=True)
class VmSpec:
    kernel: Path
    initrd: Path
    console_socket: Path  # QEMU connects to these two; we listen first, so there is no race
    qmp_socket: Path
    vsock: VsockDevice | None = None
    share: ShareDevice | None = None
    kernel_params: tuple[str, ...] = ()
    qemu: str = "qemu-system-x86_64"
    machine: Literal["q35", "microvm"] = "q35"
    accel: Literal["kvm", "tcg"] = "tcg"
    cpus: int = 1
    memory_mib: int = 512
    name: str = "vmm-task"
    extra_args: tuple[str, ...] = field(default=())


def build_argv(spec: VmSpec) -> list[str]:
    """The full argv (argv[0] = the QEMU binary) for `spec`."""
    bus = "pci" if spec.machine == "q35" else "device"
    argv = [
        spec.qemu,
        "-name", spec.name,
        "-machine", _machine(spec),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-smp", str(spec.cpus),
        "-m", f"{spec.memory_mib}M",
        "-object", f"memory-backend-memfd,id=mem,size={spec.memory_mib}M,share=on",
    ]
    if spec.accel == "kvm":
        argv += ["-cpu", "host"]
    argv += [
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initrd),
        "-append", " ".join(kernel_params(spec)),
        "-chardev", f"socket,id=console,path={_opt(spec.console_socket)}",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=qmp,path={_opt(spec.qmp_socket)}",
        "-mon", "chardev=qmp,mode=control",
    ]
    argv += _vsock_args(spec.vsock, bus) + _share_args(spec.share, bus) + list(spec.extra_args)
    return argv


def kernel_params(spec: VmSpec) -> list[str]:
    """console on the first serial port; a panic (PID 1 dying) ends QEMU via -no-reboot."""
    params = ["console=ttyS0", "panic=-1"]
    if spec.share is not None:
        params.append("task.sharefs_type=" + ("virtiofs" if isinstance(spec.share, VirtiofsShare) else "9p"))
    return params + list(spec.kernel_params)


def _machine(spec: VmSpec) -> str:
    # memory-backend= puts all RAM in the shared memfd without a NUMA node (microvm has no NUMA).
    opts = [spec.machine, f"accel={spec.accel}", "memory-backend=mem"]
    if spec.machine == "microvm":
        # No legacy PIC/PIT/RTC to emulate; the kernel uses the LAPIC timer. Keep the ISA serial.
        opts += ["pic=off", "pit=off", "rtc=off"]
    return ",".join(opts)


def _vsock_args(vsock: VsockDevice | None, bus: str) -> list[str]:
    if vsock is None:
        return []
    if isinstance(vsock, HybridVsock):
        return ["-chardev", f"socket,id=vsock,path={_opt(vsock.socket_path)}",
                "-device", f"vhost-user-vsock-{bus},chardev=vsock"]
    return ["-device", f"vhost-vsock-{bus},guest-cid={vsock.guest_cid}"]


def _share_args(share: ShareDevice | None, bus: str) -> list[str]:
    if share is None:
        return []
    if isinstance(share, VirtiofsShare):
        return ["-chardev", f"socket,id=fs,path={_opt(share.socket_path)}",
                "-device", f"vhost-user-fs-{bus},chardev=fs,tag={SHARE_TAG}"]
    return ["-fsdev", f"local,id=fs,path={_opt(share.directory)},security_model=none",
            "-device", f"virtio-9p-{bus},fsdev=fs,mount_tag={SHARE_TAG}"]


def _opt(path: Path) -> str:
    """A path as a QEMU option value: commas are escaped by doubling."""
    return str(path).replace(",", ",,")
