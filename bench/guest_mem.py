"""Guest memory in use at idle: MemTotal - MemAvailable inside the guest, our image in each mode
(initrd, pmem root) vs the floor; and how much of the guest's RAM the host holds.

    python -m bench.guest_mem [--runs 3] [--settle 2]

Every image boots with the same kernel, launcher and devices (bench.boot's config). `--settle`
seconds after the ready line, /proc/meminfo is read: in our guest by a busybox probe container
(bench.agent_task's VmTarget; crun and the probe have exited when the file is read, their page
cache stays counted), in the floor by its /init itself (the floor image with an /init that mounts
/proc, sleeps the same time and prints the two lines on the console). Then the resident size of
the guest RAM's memfd in QEMU (/proc/PID/smaps): what the host really spends on the guest's
RAM, measured with virtio-balloon free page reporting on and off. Prints one JSON object: kB per
run for each image.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

from bench import boot
from bench.agent_task import VmTarget
from bench.template_trial import setup_sandbox
from host_sandboxer.config import DEFAULT_IMAGE_DIR
from host_sandboxer.vmm.vm import GuestVm
from initrd import cpio, floor
from initrd.guest_image import compressed_image, write_atomic
from kernel import build as kernel_build

MEMINFO_MARK = "bench-meminfo"
RAM_MAPPING = "/memfd:memory-backend-memfd"  # QEMU's name for the guest RAM (vmm/cmdline.py)
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


def ram_resident_kb(smaps: str) -> int:
    """Rss (kB) of the guest RAM's memfd mappings in QEMU's /proc/PID/smaps text."""
    total, in_ram = 0, False
    for line in smaps.splitlines():
        fields = line.split()
        if fields and not fields[0].endswith(":"):  # a mapping's header
            in_ram = len(fields) > 5 and fields[5] == RAM_MAPPING
        elif in_ram and fields[0] == "Rss:":
            total += int(fields[1])
    return total


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
    """A booted guest; a clone (vm.template) after SetupSandbox, which mounts its share."""
    share = work / "share"
    share.mkdir()
    vm = GuestVm(config, work / "vm", name=name, share_dir=share, templates=boot.template_store(config))
    await vm.start()
    if vm.templates is not None:
        client = await vm.ttrpc_client()
        try:
            answer = await setup_sandbox(client, name)
        finally:
            await client.close()
        if answer != "ok":
            raise RuntimeError(f"SetupSandbox in the clone: {answer}")
    return vm


async def ours_once(config, settle_s: float) -> tuple[int, int]:
    """(kB in use in the guest, kB of its RAM resident on the host) `settle_s` after ready."""
    work = Path(tempfile.mkdtemp(prefix="bench-mem-"))
    vm = await _booted(config, "bench-mem", work)
    try:
        await asyncio.sleep(settle_s)
        client = await vm.ttrpc_client()
        try:
            used = await VmTarget(vm, client, work / "share").probe("cat /proc/meminfo", used_kb)
        finally:
            await client.close()
        await asyncio.sleep(settle_s)  # free page reporting works in batches, ~2 s apart
        if vm.ram_file is not None:  # a clone's RAM file holds its copy of the template's pages too
            return used, os.stat(vm.ram_file).st_blocks * 512 // 1024
        return used, ram_resident_kb(Path(f"/proc/{vm.qemu.proc.pid}/smaps").read_text())
    finally:
        await vm.close()
        shutil.rmtree(work, ignore_errors=True)


async def floor_once(config, initrd: Path, settle_s: float) -> int:
    work = Path(tempfile.mkdtemp(prefix="bench-mem-"))
    config = dataclasses.replace(config, vm=dataclasses.replace(config.vm, image="initrd", initrd=initrd))
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
    used: dict[str, list] = {mode: [] for mode in boot.MODES}
    resident: dict[str, list] = {f"{mode}{variant}": [] for mode in boot.MODES for variant in ("", "_no_fpr")}
    used["floor"] = []
    for _ in range(runs):  # interleaved, so load drifts hit all alike
        for mode, fields in boot.MODES.items():
            for variant, fpr in (("", True), ("_no_fpr", False)):
                vm = dataclasses.replace(config.vm, free_page_reporting=fpr, **fields)
                kb, ram_kb = await ours_once(dataclasses.replace(config, vm=vm), settle_s)
                resident[mode + variant].append(ram_kb)
                if fpr == config.vm.free_page_reporting:
                    used[mode].append(kb)
        used["floor"].append(await floor_once(config, floor_initrd, settle_s))
    return {"settle_s": settle_s, "memory_mib": config.vm.memory_mib,
            "free_page_reporting": config.vm.free_page_reporting,
            "used_kb": used, "ram_resident_kb": resident}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds idle after ready")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.runs, args.settle))))


if __name__ == "__main__":
    main()
