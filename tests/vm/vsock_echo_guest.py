"""A test-only guest for the vsock tests and bench/vsock.py: the project's guest kernel plus a
tiny initrd whose /init is vsock_echo.c (echo/source/sink servers, see there), booted with the
real launcher (host_sandboxer.vmm.vm.GuestVm) over the hybrid transport.

The initrd is built with `gcc -static` into the cache, keyed by the source's hash.
"""

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SOURCE = HERE / "vsock_echo.c"
ECHO, SOURCE_PORT, SINK = 5000, 5001, 5002
HOST_ECHO_PORT, HOST_REFUSED_PORT = 6000, 6001
BLOCK = 1 << 20


def cache_dir() -> Path:
    return Path(os.environ.get("VMM_TASK_CACHE", Path.home() / ".cache" / "vmm-task")) / "vsock-echo"


def guest_kernel() -> Path:
    """build/guest/kernel if `make guest-image` ran, else the kernel build's cached vmlinux (PVH ELF)."""
    built = ROOT / "build" / "guest" / "kernel"
    if built.is_file():
        return built
    out = subprocess.run([sys.executable, "-m", "kernel.build"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.split()
    return Path(out[-1])


def echo_initrd() -> Path:
    """The cpio initrd holding /init (static vsock_echo) and /dev/console."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    initrd = cache_dir() / f"initrd-{digest}.cpio"
    if initrd.is_file():
        return initrd
    initrd.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "init"
        subprocess.run(["gcc", "-static", "-O2", "-o", str(binary), str(SOURCE)], check=True)
        subprocess.run(["strip", str(binary)], check=True)
        data = _cpio([("dev", 0o040755, b"", 0), ("dev/console", 0o020600, b"", os.makedev(5, 1)),
                      ("init", 0o100755, binary.read_bytes(), 0)])
    partial = initrd.with_suffix(".partial")
    partial.write_bytes(data)
    partial.rename(initrd)
    return initrd


def _cpio(entries: list) -> bytes:
    """newc cpio archive of (name, mode, data, rdev)."""
    out = bytearray()

    def add(ino, name, mode, data, rdev):
        name_b = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, os.major(rdev), os.minor(rdev), len(name_b), 0]
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + name_b)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data, rdev) in enumerate(entries, 1):
        add(ino, name, mode, data, rdev)
    add(0, "TRAILER!!!", 0, b"", 0)
    return bytes(out)


def expected_block() -> bytes:
    """The 1 MiB xorshift32 block the guest's source port repeats."""
    import array
    x = 2463534242
    words = array.array("I", bytes(BLOCK))
    for i in range(BLOCK // 4):
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        words[i] = x
    return words.tobytes()


def make_vm(run_dir: Path, name: str = "vsock-echo", memory_mib: int = 256):
    """A GuestVm (not started) booting the echo guest with the hybrid transport."""
    from host_sandboxer.config import load_config
    from host_sandboxer.vmm.vm import GuestVm
    config = load_config(None)
    config.vm = dataclasses.replace(config.vm, kernel=guest_kernel(), initrd=echo_initrd(), image="initrd",
                                    memory_mib=memory_mib, boot_timeout_s=60.0)
    config.vsock = dataclasses.replace(config.vsock, transport="hybrid")
    return GuestVm(config, run_dir, name=name)


def short_run_dir() -> Path:
    """Socket paths must stay under 108 bytes: not pytest's deep tmp_path."""
    return Path(tempfile.mkdtemp(prefix="vsock-"))


def remove_run_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
