"""Host <-> guest vsock transports. See docs/vsock.md.

Every transport has the same face, used by the QEMU launcher and the Task API forwarder:
    await t.start()                 # before QEMU starts
    t.qemu_args() -> list           # the -chardev/-device arguments for QEMU
    t.needs_shared_memory           # True: guest RAM must be memory-backend-memfd,share=on
    await t.open_connection(port)   # -> (asyncio.StreamReader, asyncio.StreamWriter)
    await t.open_socket(port)       # -> a connected non-blocking socket (the handshake done)
    t.dead                          # Future[str]: resolves with a reason when the link is gone
    await t.close()

The transports (asyncio-based) load on first use: the backend process (serve.py) imports this
package but runs without asyncio.
"""

import os

KINDS = ("auto", "hybrid", "kernel")

_cids = None


def _kernel_usable() -> bool:
    from .kernel import usable
    return usable()


def choose_kind(kind: str, kernel_usable=_kernel_usable) -> str:
    """`auto` is kernel vsock when /dev/vhost-vsock is usable, else hybrid."""
    if kind not in KINDS:
        raise ValueError(f"vsock transport {kind!r}: expected one of {', '.join(KINDS)}")
    if kind == "auto":
        return "kernel" if kernel_usable() else "hybrid"
    if kind == "kernel" and not kernel_usable():
        from .kernel import VHOST_VSOCK_DEVICE
        raise RuntimeError(f"vsock transport 'kernel' needs a usable {VHOST_VSOCK_DEVICE}")
    return kind


def create_transport(kind: str, vm_dir: str, kernel_usable=_kernel_usable, cids=None):
    """A transport for one VM whose files live in `vm_dir` (keep it short: unix paths max 107 bytes).
    `cids`: the kernel transport's CidAllocator (default: one for the process)."""
    global _cids
    if choose_kind(kind, kernel_usable) == "kernel":
        from .kernel import CidAllocator, KernelVsock
        if cids is None:
            if _cids is None:
                _cids = CidAllocator()
            cids = _cids
        return KernelVsock(cids.allocate(), release=cids.release)
    from .hybrid import HybridVsock
    return HybridVsock(os.path.join(vm_dir, "vhost-vsock.sock"), os.path.join(vm_dir, "vsock.sock"))


def qemu_args(vhost_socket: str, chardev_id: str = "vsock0", fd: int | None = None) -> list:
    """QEMU's arguments for a vhost-user-vsock device served on `vhost_socket` (hybrid vsock,
    in-process or through the backend process); `fd`: a connection to it made for QEMU."""
    where = f"fd={fd}" if fd is not None else f"path={vhost_socket}"
    return ["-chardev", f"socket,id={chardev_id},{where}",
            "-device", f"vhost-user-vsock-pci,chardev={chardev_id}"]


def __getattr__(name: str):
    if name == "HybridVsock":
        from .hybrid import HybridVsock
        return HybridVsock
    if name in ("KernelVsock", "CidAllocator"):
        from . import kernel
        return getattr(kernel, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["HybridVsock", "KernelVsock", "CidAllocator", "choose_kind", "create_transport", "qemu_args", "KINDS"]
