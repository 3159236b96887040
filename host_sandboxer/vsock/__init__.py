"""Host <-> guest vsock transports. See docs/vsock.md.

Every transport has the same face, used by the QEMU launcher and the Task API forwarder:
    await t.start()                 # before QEMU starts
    t.qemu_args() -> list           # the -chardev/-device arguments for QEMU
    t.needs_shared_memory           # True: guest RAM must be memory-backend-memfd,share=on
    await t.open_connection(port)   # -> (asyncio.StreamReader, asyncio.StreamWriter)
    t.dead                          # Future[str]: resolves with a reason when the link is gone
    await t.close()
"""

import os

from . import kernel
from .hybrid import HybridVsock
from .kernel import CidAllocator, KernelVsock

KINDS = ("auto", "hybrid", "kernel")

_cids = CidAllocator()


def choose_kind(kind: str, kernel_usable=kernel.usable) -> str:
    """`auto` is kernel vsock when /dev/vhost-vsock is usable, else hybrid."""
    if kind not in KINDS:
        raise ValueError(f"vsock transport {kind!r}: expected one of {', '.join(KINDS)}")
    if kind == "auto":
        return "kernel" if kernel_usable() else "hybrid"
    if kind == "kernel" and not kernel_usable():
        raise RuntimeError(f"vsock transport 'kernel' needs a usable {kernel.VHOST_VSOCK_DEVICE}")
    return kind


def create_transport(kind: str, vm_dir: str, kernel_usable=kernel.usable, cids: CidAllocator = _cids):
    """A transport for one VM whose files live in `vm_dir` (keep it short: unix paths max 107 bytes)."""
    if choose_kind(kind, kernel_usable) == "kernel":
        return KernelVsock(cids.allocate(), release=cids.release)
    return HybridVsock(os.path.join(vm_dir, "vhost-vsock.sock"), os.path.join(vm_dir, "vsock.sock"))


__all__ = ["HybridVsock", "KernelVsock", "CidAllocator", "choose_kind", "create_transport", "KINDS"]
