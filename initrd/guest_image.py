"""`make guest-image`: kernel + agent + userland ->
build/guest/{kernel,initrd.img,rootfs.img,manifest.json}.

Stages: kernel (cached build from Debian's source), agent (cached Nuitka build), userland
(crun/runc + libraries from pinned Debian 13 packages, cached by sha256, pod-pause compiled from
rootfs-builder/pod-pause.c, + /etc), initrd
(deterministic cpio, compressed; the compressed image is cached by the cpio's hash), rootfs (the
same files as a read-only erofs image for a virtio-pmem root with DAX, cached by the same hash),
manifest. Each stage prints one line; with nothing changed the whole run takes seconds.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import subprocess
import sys
import time
from pathlib import Path

from initrd import agent as agent_build
from initrd import compress, cpio, guest_runtime, image, manifest, pod_pause, rootfs_image
from kernel import build as kernel_build

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "build" / "guest"


def say(message: str) -> None:
    print(f"guest-image: {message}", flush=True)


def mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def compressed_image(raw: bytes, method: str, cache: Path) -> bytes:
    """`raw` compressed with `method`, reusing the result of an earlier identical build."""
    cached = cache / "initrd" / f"{hashlib.sha256(raw).hexdigest()}.{method}"
    if cached.exists():
        return cached.read_bytes()
    data = compress.compress(raw, method)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".partial")
    tmp.write_bytes(data)
    tmp.replace(cached)
    return data


def rootfs(tree, raw: bytes, cache: Path) -> Path:
    """The erofs image of `tree` (whose cpio is `raw`), reusing an earlier identical build."""
    cached = cache / "rootfs" / f"{hashlib.sha256(raw).hexdigest()}.erofs"
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        rootfs_image.build_image(tree, cached)
    return cached


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    tmp.replace(path)


def build(out: Path, runtime: str, debug: bool, method: str, cache: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}

    t = time.monotonic()
    kernel = kernel_build.ensure_kernel(cache, progress=say)
    shutil.copyfile(kernel.vmlinux, out / "kernel.partial")
    (out / "kernel.partial").replace(out / "kernel")
    stages["kernel"] = time.monotonic() - t
    kernel_size = (out / "kernel").stat().st_size
    say(f"kernel   {kernel.release}{' (cached)' if kernel.cached else ''}: {mb(kernel_size)}"
        f"  [{stages['kernel']:.1f} s]")

    t = time.monotonic()
    agent = agent_build.ensure_agent(cache, progress=say)
    stages["agent"] = time.monotonic() - t
    say(f"agent    Nuitka standalone{' (cached)' if agent.cached else ''}: {mb(agent.size)},"
        f" {len(agent.modules)} modules  [{stages['agent']:.1f} s]")

    t = time.monotonic()
    prepared = guest_runtime.prepare(runtime, cache, progress=say)
    pause = pod_pause.build(cache)
    tree = image.guest_tree(agent, prepared, pause, debug)
    stages["userland"] = time.monotonic() - t
    packages = [{"name": p.name, "version": p.version, "sha256": p.sha256}
                for p in prepared.packages]
    version = next(p.version for p in prepared.packages if p.name == runtime)
    say(f"userland {runtime} {version} + {len(packages) - 1} library "
        f"packages (Debian {guest_runtime.SUITE}) + pod-pause{' + busybox' if debug else ''}, "
        f"{len(tree.entries)} entries in all  [{stages['userland']:.1f} s]")

    t = time.monotonic()
    raw = io.BytesIO()
    cpio.write_newc(tree.entries.values(), raw)
    data = compressed_image(raw.getvalue(), method, cache)
    write_atomic(out / "initrd.img", data)
    stages["initrd"] = time.monotonic() - t
    say(f"initrd   {method}: {mb(len(data))} ({mb(raw.tell())} uncompressed)"
        f"  [{stages['initrd']:.1f} s]")

    t = time.monotonic()
    shutil.copyfile(rootfs(tree, raw.getvalue(), cache), out / "rootfs.img.partial")
    (out / "rootfs.img.partial").replace(out / "rootfs.img")
    rootfs_size = (out / "rootfs.img").stat().st_size
    stages["rootfs"] = time.monotonic() - t
    say(f"rootfs   erofs for virtio-pmem + DAX: {mb(rootfs_size)}  [{stages['rootfs']:.1f} s]")

    result = {
        # `file`: the ELF QEMU boots (PVH); `bzimage_size`: the same kernel compressed, as a
        # bootloader would load it (the size the kernel's target is stated in).
        "kernel": {"file": "kernel", "format": "elf-pvh", "release": kernel.release, "size": kernel_size,
                   "bzimage_size": kernel.image.stat().st_size,
                   "sha256": manifest.sha256_file(out / "kernel"),
                   "config_sha256": kernel.config_sha256},
        "initrd": {"file": "initrd.img", "compression": method, "size": len(data),
                   "uncompressed_size": raw.tell(), "sha256": hashlib.sha256(data).hexdigest(),
                   "source_date_epoch": cpio.source_date_epoch()},
        "rootfs": {"file": "rootfs.img", "filesystem": "erofs", "size": rootfs_size,
                   "sha256": manifest.sha256_file(out / "rootfs.img")},
        "agent": {"build_mode": "nuitka-standalone", "path": f"/{image.AGENT_DIR}/{agent.binary}",
                  "cache_key": agent.key, "dist_size": agent.size, "modules": agent.modules},
        "runtime": runtime,
        "pod_pause": {"path": f"/{pod_pause.GUEST_PATH}", "source": "rootfs-builder/pod-pause.c",
                      "sha256": manifest.sha256_file(pause)},
        "packages": packages,
        "debug": debug,
        "total_size": kernel_size + len(data),
        "stage_seconds": {name: round(seconds, 2) for name, seconds in stages.items()},
        "files": manifest.file_list(tree),
    }
    manifest.write_manifest(out / "manifest.json", result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the guest kernel and initrd.")
    parser.add_argument("--runtime", default="crun", choices=["crun", "runc"])
    parser.add_argument("--debug", default="0", choices=["0", "1"],
                        help="1: add a static busybox (debug shell)")
    parser.add_argument("--compression", default=compress.DEFAULT, choices=sorted(compress.COMMANDS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args()
    started = time.monotonic()
    try:
        result = build(args.out, args.runtime, args.debug == "1", args.compression,
                       args.cache or kernel_build.default_cache())
    except (RuntimeError, OSError, ValueError, subprocess.CalledProcessError) as e:
        sys.exit(f"guest-image: FAILED: {e}")
    say(f"done in {time.monotonic() - started:.1f} s: {args.out}/kernel + initrd.img = "
        f"{mb(result['total_size'])}; manifest.json lists {len(result['files'])} entries")


if __name__ == "__main__":
    main()
