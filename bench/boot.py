"""Boot benchmark: QEMU start -> "vmm-task ready" for the guest image and for the floor.

    python -m bench.boot [--runs 5] [--machine q35|microvm] [--sharefs virtiofs|9p]

Both images boot with the same kernel, the same launcher (host_sandboxer.vmm.vm.GuestVm) and the
same devices (hybrid vsock, the shared directory); the floor's /init is a static busybox that
prints the ready line at once (initrd/floor.py, built here if absent). Prints one JSON object:
per image the median, min, max and spread over the runs (seconds from QEMU's spawn to the line
arriving on the host), the guest's own uptime at that line, the ratio agent/floor of the medians,
and the sizes of kernel, initrd, floor initrd and agent dist.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from host_sandboxer.config import DEFAULT_IMAGE_DIR, load_config
from host_sandboxer.vmm.accel import resolve_accel
from host_sandboxer.vmm.vm import GuestVm
from initrd import floor
from kernel import build as kernel_build

FLOOR_DIR = DEFAULT_IMAGE_DIR.parent / "guest-floor"


async def boot_once(config, name: str) -> tuple[float, float | None]:
    """(host seconds from QEMU spawn to the ready line, guest uptime at that line)."""
    run_dir = Path(tempfile.mkdtemp(prefix="bench-"))
    share = run_dir / "share"
    share.mkdir()
    vm = GuestVm(config, run_dir / "vm", name=name, share_dir=share)
    try:
        timeline = await vm.start()
    finally:
        await vm.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    return timeline.agent_ready_s, timeline.agent_ready_guest_s


def summary(samples: list[tuple[float, float | None]]) -> dict:
    host = [s[0] for s in samples]
    guest = [s[1] for s in samples if s[1] is not None]
    return {
        "median_s": round(statistics.median(host), 3),
        "min_s": round(min(host), 3),
        "max_s": round(max(host), 3),
        "spread_s": round(max(host) - min(host), 3),
        "stdev_s": round(statistics.stdev(host), 3) if len(host) > 1 else 0.0,
        "guest_uptime_median_s": round(statistics.median(guest), 3) if guest else None,
        "samples_s": [round(h, 3) for h in host],
    }


async def run(args) -> dict:
    config = load_config(None)
    config.vsock = dataclasses.replace(config.vsock, transport="hybrid")
    config.sharefs = dataclasses.replace(config.sharefs, type=args.sharefs)
    base_vm = dataclasses.replace(config.vm, machine=args.machine, boot_timeout_s=120.0)
    floor_initrd = floor.build_floor(FLOOR_DIR, args.compression, kernel_build.default_cache())
    images = {"agent": DEFAULT_IMAGE_DIR / "initrd.img", "floor": floor_initrd}
    results: dict[str, list] = {name: [] for name in images}
    for i in range(args.runs):  # interleaved, so machine load drifts hit both alike
        for name, initrd in images.items():
            config.vm = dataclasses.replace(base_vm, initrd=initrd)
            results[name].append(await boot_once(config, f"bench-{name}-{i}"))
    manifest = json.loads((DEFAULT_IMAGE_DIR / "manifest.json").read_text())
    agent, floor_ = summary(results["agent"]), summary(results["floor"])
    return {
        "runs": args.runs,
        "machine": args.machine,
        "accel": resolve_accel(config.vm.accel).accel,
        "sharefs": args.sharefs,
        "agent": agent,
        "floor": floor_,
        "ratio_median": round(agent["median_s"] / floor_["median_s"], 3),
        "sizes_bytes": {
            "kernel": manifest["kernel"]["size"],
            "initrd": manifest["initrd"]["size"],
            "initrd_uncompressed": manifest["initrd"]["uncompressed_size"],
            "initrd_compression": manifest["initrd"]["compression"],
            "floor_initrd": floor_initrd.stat().st_size,
            "agent_dist": manifest["agent"]["dist_size"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--machine", default="q35", choices=["q35", "microvm"])
    parser.add_argument("--sharefs", default="virtiofs", choices=["virtiofs", "9p"])
    parser.add_argument("--compression", default=None,
                        help="floor initrd compression (default: the guest image's)")
    args = parser.parse_args()
    if not (DEFAULT_IMAGE_DIR / "manifest.json").exists():
        sys.exit("bench.boot: no guest image: run `make guest-image` first")
    if args.compression is None:
        manifest = json.loads((DEFAULT_IMAGE_DIR / "manifest.json").read_text())
        args.compression = manifest["initrd"]["compression"]
    print(json.dumps(asyncio.run(run(args)), indent=1))


if __name__ == "__main__":
    main()
