"""Guest memory in use at idle: MemTotal - MemAvailable inside the guest, our image vs the floor.

    python -m bench.guest_mem [--runs 3] [--settle 2]

Both images boot with the same kernel, launcher and devices (bench.boot's config). `--settle`
seconds after the ready line, /proc/meminfo is read: in our guest by a busybox probe container
(bench.agent_task's VmTarget; crun and the probe have exited when the file is read, their page
cache stays counted), in the floor by its /init itself (the floor image with an /init that mounts
/proc, sleeps the same time and prints the two lines on the console). Prints one JSON object:
kB per run for each image.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import shutil
import tempfile
from pathlib import Path

from bench import boot
from bench.agent_task import VmTarget
from host_sandboxer.config import DEFAULT_IMAGE_DIR
from host_sandboxer.vmm.vm import GuestVm
from initrd import cpio, floor
from initrd.guest_image import compressed_image, write_atomic
from kernel import build as kernel_build

MEMINFO_MARK = "bench-meminfo"
GUEST_BUSYBOX = "/usr/bin/busybox"  # where initrd.floor puts it
FLOOR_MEM_DIR = DEFAULT_IMAGE_DIR.parent / "guest-floor-meminfo"


def used_kb(meminfo: str) -> int | None:
    """MemTotal - MemAvailable (kB) from /proc/meminfo text (any separators), None if absent."""
    words = meminfo.split()
    values = {}
    for key in ("MemTotal:", "MemAvailable:"):
        if key in words[:-1]:
            values[key] = int(words[words.index(key) + 1])
    if len(values) < 2:
        return None
    return values["MemTotal:"] - values["MemAvailable:"]


def floor_meminfo_init(settle_s: float) -> bytes:
    bb = GUEST_BUSYBOX
    return (f"#!{bb} sh\n"
            f'echo "{floor.READY_LINE}"\n'
            f"{bb} mount -t proc proc /proc\n"
            f"{bb} sleep {settle_s}\n"
            f'echo "{MEMINFO_MARK} $({bb} grep -E "^Mem(Total|Available):" /proc/meminfo | {bb} tr "\\n" " ")"\n'
            f"exec {bb} sleep 2147483647\n").encode()


def build_floor_meminfo(settle_s: float, method: str) -> Path:
    """The floor image whose /init also reports its meminfo `settle_s` after the ready line."""
    tree = floor.floor_tree()
    del tree.entries["init"]
    tree.file("init", floor_meminfo_init(settle_s), 0o755)
    if "proc" not in tree:  # the floor may have its own mount point already
        tree.directory("proc")
    raw = io.BytesIO()
    cpio.write_newc(tree.entries.values(), raw)
    FLOOR_MEM_DIR.mkdir(parents=True, exist_ok=True)
    out = FLOOR_MEM_DIR / "initrd.img"
    write_atomic(out, compressed_image(raw.getvalue(), method, kernel_build.default_cache()))
    return out


async def _booted(config, name: str, work: Path) -> GuestVm:
    share = work / "share"
    share.mkdir()
    vm = GuestVm(config, work / "vm", name=name, share_dir=share)
    await vm.start()
    return vm


async def ours_once(config, settle_s: float) -> int:
    work = Path(tempfile.mkdtemp(prefix="bench-mem-"))
    vm = await _booted(config, "bench-mem", work)
    try:
        await asyncio.sleep(settle_s)
        client = await vm.ttrpc_client()
        try:
            return await VmTarget(vm, client, work / "share").probe("cat /proc/meminfo", used_kb)
        finally:
            await client.close()
    finally:
        await vm.close()
        shutil.rmtree(work, ignore_errors=True)


async def floor_once(config, initrd: Path, settle_s: float) -> int:
    work = Path(tempfile.mkdtemp(prefix="bench-mem-"))
    config = dataclasses.replace(config, vm=dataclasses.replace(config.vm, initrd=initrd))
    vm = await _booted(config, "bench-mem-floor", work)
    try:
        line = await asyncio.wait_for(vm.console.line_containing(MEMINFO_MARK), settle_s + 60)
        value = used_kb(line.text)
        if value is None:
            raise RuntimeError(f"floor meminfo line unreadable: {line.text!r}")
        return value
    finally:
        await vm.close()
        shutil.rmtree(work, ignore_errors=True)


async def run(runs: int, settle_s: float) -> dict:
    config = boot.bench_config(argparse.Namespace(sharefs="virtiofs", machine="q35"))
    manifest = json.loads((DEFAULT_IMAGE_DIR / "manifest.json").read_text())
    floor_initrd = build_floor_meminfo(settle_s, manifest["initrd"]["compression"])
    ours, floors = [], []
    for _ in range(runs):  # interleaved, so load drifts hit both alike
        ours.append(await ours_once(config, settle_s))
        floors.append(await floor_once(config, floor_initrd, settle_s))
    return {"settle_s": settle_s, "memory_mib": config.vm.memory_mib,
            "used_kb": {"agent": ours, "floor": floors}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds idle after ready")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.runs, args.settle))))


if __name__ == "__main__":
    main()
