"""Boot benchmark: QEMU start -> "vmm-task ready" for the guest image in each mode (the initrd,
the pmem root: vm.image; a clone of a template: vm.template) and for the floor.

    python -m bench.boot [--runs 5] [--machine q35|microvm] [--sharefs virtiofs|9p]
    python -m bench.boot --compressions gzip,xz,zstd,lz4 [--runs 5]

Every image boots with the same kernel, the same launcher (host_sandboxer.vmm.vm.GuestVm) and the
same devices (hybrid vsock, the shared directory); the floor's /init is a static busybox that
prints the ready line at once (initrd/floor.py, built here if absent). On q35 a second floor, the
Python floor, boots a pmem root whose /init is a Nuitka-compiled Python program doing the same
(built with the agent's options): what a Python PID 1 costs before its first line of work.
Prints one JSON object: per mode and for each floor the median, min, max and spread over the runs
(seconds from QEMU's spawn to the line arriving on the host), the guest's uptime when the kernel
ran /init, the ratios mode/floor and mode/Python floor of the medians, and the sizes of kernel,
initrd, root image, floor initrd and agent dist. microvm has no virtio-pmem: only the initrd mode
boots there. A clone (the template mode) is ready when its agent answers over the hot-plugged
vsock, counted from the copy of the template's RAM; the template, built by the first clone of the
process (template_store()), is not counted.

With --compressions, the guest initrd's cpio is recompressed with each method instead and each
variant is booted: boot time against size, the measurement behind initrd/compress.DEFAULT.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import atexit
import statistics
import sys
import tempfile
from pathlib import Path

from host_sandboxer.config import DEFAULT_IMAGE_DIR, load_config
from host_sandboxer.vmm.accel import resolve_accel
from host_sandboxer.vmm.template import TemplateStore
from host_sandboxer.vmm.vm import GuestVm
from initrd import compress, floor
from kernel import build as kernel_build

FLOOR_DIR = DEFAULT_IMAGE_DIR.parent / "guest-floor"
# The guest image's boot modes: the VmConfig fields each sets.
MODES = {"initrd": {"image": "initrd"}, "pmem": {"image": "pmem"}, "template": {"image": "pmem", "template": True}}
_templates: list[TemplateStore] = []


def modes_for(machine: str) -> dict[str, dict]:
    return {name: fields for name, fields in MODES.items() if machine == "q35" or name == "initrd"}


def template_store(config) -> TemplateStore | None:
    """The process's template store for a config with vm.template (its files go at exit)."""
    if not config.vm.template:
        return None
    if not _templates:
        root = Path(tempfile.mkdtemp(prefix="bench-tpl-"))
        _templates.append(TemplateStore(root))
        atexit.register(shutil.rmtree, _templates[0].ram_dir, True)
        atexit.register(shutil.rmtree, root, True)
    return _templates[0]


async def boot_once(config, name: str):
    """The boot timeline (host seconds since QEMU's spawn, guest uptimes) of one boot; a clone's
    ready time counts from its RAM copy."""
    run_dir = Path(tempfile.mkdtemp(prefix="bench-"))
    share = run_dir / "share"
    share.mkdir()
    vm = GuestVm(config, run_dir / "vm", name=name, share_dir=share, templates=template_store(config))
    try:
        timeline = await vm.start()
        if timeline.restore is None:
            return timeline
        return dataclasses.replace(timeline, agent_ready_s=timeline.agent_ready_s + timeline.restore["ram_copy_s"])
    finally:
        await vm.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 3) if known else None


def summary(timelines: list) -> dict:
    """Host-side ready times (median, min, max, spread, stdev, samples), and the guest's uptime
    when the kernel ran /init: kernel boot + initrd unpacking, on the guest's own clock, which
    QEMU's start-up and host scheduling before the guest runs do not blur."""
    host = [t.agent_ready_s for t in timelines]
    return {
        "median_s": round(statistics.median(host), 3),
        "min_s": round(min(host), 3),
        "max_s": round(max(host), 3),
        "spread_s": round(max(host) - min(host), 3),
        "stdev_s": round(statistics.stdev(host), 3) if len(host) > 1 else 0.0,
        "kernel_ran_init_uptime_median_s": _median([t.kernel_init_guest_s for t in timelines]),
        "ready_uptime_median_s": _median([t.agent_ready_guest_s for t in timelines]),
        # CPU QEMU burnt until ready: what TCG emulation cost, least blurred by other load.
        "qemu_cpu_median_s": _median([t.qemu_cpu_s for t in timelines]),
        # From the agent's own ready line: /init to its __main__, and __main__ to ready.
        "agent_start_median_s": _median([_span(t, "started", "main") for t in timelines]),
        "agent_init_median_s": _median([_span(t, "main", "ready") for t in timelines]),
        "samples_s": [round(h, 3) for h in host],
    }


def _span(timeline, start: str, end: str) -> float | None:
    reported = timeline.agent_reported
    return reported[end] - reported[start] if start in reported and end in reported else None


def bench_config(args):
    config = load_config(None)
    config.vsock = dataclasses.replace(config.vsock, transport="hybrid")
    config.sharefs = dataclasses.replace(config.sharefs, type=args.sharefs)
    config.vm = dataclasses.replace(config.vm, machine=args.machine, boot_timeout_s=120.0)
    return config


async def boot_images(config, images: dict[str, dict], runs: int) -> dict[str, dict]:
    """Each image (the VmConfig fields that select it) booted `runs` times, interleaved so
    machine load drifts hit all alike."""
    base_vm = config.vm
    results: dict[str, list] = {name: [] for name in images}
    for i in range(runs):
        for name, fields in images.items():
            config.vm = dataclasses.replace(base_vm, **fields)
            results[name].append(await boot_once(config, f"bench-{name}-{i}"))
    return {name: summary(samples) for name, samples in results.items()}


async def compare_compressions(args, methods: list[str]) -> dict:
    manifest = json.loads((DEFAULT_IMAGE_DIR / "manifest.json").read_text())
    raw = compress.decompress((DEFAULT_IMAGE_DIR / "initrd.img").read_bytes(),
                              manifest["initrd"]["compression"])
    work = Path(tempfile.mkdtemp(prefix="bench-compress-"))
    try:
        images = {}
        for method in methods:
            images[method] = work / f"initrd.{method}"
            images[method].write_bytes(compress.compress(raw, method))
        results = await boot_images(bench_config(args), {
            method: {"image": "initrd", "initrd": path} for method, path in images.items()}, args.runs)
        for method, path in images.items():
            results[method]["size_bytes"] = path.stat().st_size
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"runs": args.runs, "machine": args.machine, "uncompressed_bytes": len(raw),
            "compressions": results}


def floors(args) -> dict[str, dict]:
    """The floors to boot beside the modes (the VmConfig fields that select each): busybox in an
    initrd; on q35 also the Python floor on a pmem root."""
    cache = kernel_build.default_cache()
    images = {"floor": {"image": "initrd", "initrd": floor.build_floor(FLOOR_DIR, args.compression, cache)}}
    if args.machine == "q35":
        # its first build's progress goes to stderr: stdout is the JSON
        rootfs = floor.build_python_floor(FLOOR_DIR, cache, progress=lambda line: print(line, file=sys.stderr))
        images["python_floor"] = {"image": "pmem", "rootfs": rootfs}
    return images


async def run(args) -> dict:
    config = bench_config(args)
    floor_images = floors(args)
    modes = modes_for(args.machine)
    results = await boot_images(config, {**modes, **floor_images}, args.runs)
    manifest = json.loads((DEFAULT_IMAGE_DIR / "manifest.json").read_text())
    floor_ = results.pop("floor")
    python_floor = results.pop("python_floor", None)
    return {
        "runs": args.runs,
        "machine": args.machine,
        "accel": resolve_accel(config.vm.accel).accel,
        "sharefs": args.sharefs,
        "modes": results,
        "floor": floor_,
        "python_floor": python_floor,
        "ratio_median": {m: round(r["median_s"] / floor_["median_s"], 3) for m, r in results.items()},
        # what the agent's own work costs beyond a Python PID 1's start-up (q35 only)
        "ratio_python_floor": {m: round(r["median_s"] / python_floor["median_s"], 3)
                               for m, r in results.items()} if python_floor else None,
        "python_floor_ratio": round(python_floor["median_s"] / floor_["median_s"], 3) if python_floor else None,
        "ratio_ready_uptime": {m: _ratio(r["ready_uptime_median_s"], floor_["ready_uptime_median_s"])
                               for m, r in results.items()},
        "ratio_qemu_cpu": {m: _ratio(r["qemu_cpu_median_s"], floor_["qemu_cpu_median_s"])
                           for m, r in results.items()},
        "sizes_bytes": {
            "kernel": manifest["kernel"]["size"],
            "initrd": manifest["initrd"]["size"],
            "initrd_uncompressed": manifest["initrd"]["uncompressed_size"],
            "initrd_compression": manifest["initrd"]["compression"],
            "rootfs": manifest["rootfs"]["size"],
            "floor_initrd": floor_images["floor"]["initrd"].stat().st_size,
            "agent_dist": manifest["agent"]["dist_size"],
        },
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--machine", default="q35", choices=["q35", "microvm"])
    parser.add_argument("--sharefs", default="virtiofs", choices=["virtiofs", "9p"])
    parser.add_argument("--compression", default=None,
                        help="floor initrd compression (default: the guest image's)")
    parser.add_argument("--compressions", default=None,
                        help="comma-separated methods: compare the guest initrd compressed each way")
    args = parser.parse_args()
    if not (DEFAULT_IMAGE_DIR / "manifest.json").exists():
        sys.exit("bench.boot: no guest image: run `make guest-image` first")
    if args.compression is None:
        manifest = json.loads((DEFAULT_IMAGE_DIR / "manifest.json").read_text())
        args.compression = manifest["initrd"]["compression"]
    if args.compressions:
        result = asyncio.run(compare_compressions(args, args.compressions.split(",")))
    else:
        result = asyncio.run(run(args))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
