"""Where a pod's Controller.Start goes when its VM is restored from a template ([vm] template).

    python -m bench.clone_timeline [--runs 3] [--parallel 5]

One daemon (bench.sandboxer's Bench: real QEMU, TCG here, each pod networked as a CRI pod); a
first pod builds the node's template (not counted); then `--runs` pods one at a time, each
right after a boot of the busybox floor (bench.boot: the issue's yardstick, `start_to_floor` is
the pod's Controller.Start over it), and `--parallel` pods at once. Per pod, from its Status verbose info (host_sandboxer/sandbox/
lifecycle.py, vmm/clone.py) and its guest console (the agent's "sandbox set up" line), the
spans of its Start in seconds, and QEMU's CPU seconds at the end of Start (under TCG, the
guest's work). Prints one JSON object; `cpu_floor_ratio`: what two cores allow at best for
`--parallel` pods at once against one alone, (N x CPU per clone / cores) / wall of one.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import statistics
import time

from bench import boot
from bench.boot import MODES
from bench.sandboxer import Bench
from host_sandboxer.config import DEFAULT_IMAGE_DIR
from host_sandboxer.vmm import process
from host_sandboxer.vmm.template import TemplateStore
from initrd import floor
from kernel import build as kernel_build
from scripts import demo
from vmm_common.protos.containerd.services.sandbox.v1 import sandbox_pb2 as sb

SETUP_LINE = re.compile(r"sandbox set up: .*seconds: reseed ([\d.]+), share ([\d.]+), namespaces ([\d.]+), "
                        r"network and files ([\d.]+)")


def _cpu_by_kind(bench: Bench) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of every process whose command line names the bench's directory (the
    daemon, its helpers, virtiofsd) or its clones' RAM directory (QEMU), by pid: (kind, seconds)."""
    marks = (str(bench.work).encode(), str(TemplateStore(bench.daemon.state).ram_dir).encode())
    found = {}
    for entry in os.listdir("/proc"):
        try:
            if not entry.isdigit():
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            if not any(mark in cmdline for mark in marks):
                continue
            exe = os.path.basename(os.readlink(f"/proc/{entry}/exe"))
        except OSError:
            continue
        if (seconds := process.cpu_seconds(int(entry))) is None:
            continue
        kind = "qemu" if exe.startswith("qemu-system") else "virtiofsd" if exe.startswith("virtiofsd") else "daemon_and_helpers"
        found[int(entry)] = (kind, seconds)
    return found


def _timed_start(bench: Bench, ids: list[str]) -> tuple[float, dict]:
    """Start the pods at once: wall seconds, and the CPU seconds each kind of process used meanwhile
    (QEMU counted until the last pod is ready: its processes live on)."""
    before = _cpu_by_kind(bench)
    wall = bench.start_pods(ids)
    used: dict[str, float] = {}
    for pid, (kind, seconds) in _cpu_by_kind(bench).items():
        used[kind] = used.get(kind, 0.0) + seconds - before.get(pid, (kind, 0.0))[1]
    return wall, {kind: round(seconds, 2) for kind, seconds in sorted(used.items())}


def _floor_boot() -> dict:
    """The busybox floor booted once (bench.boot: QEMU's spawn to its ready line), now: the
    yardstick of the pod started next, under the same load."""
    compression = json.loads((DEFAULT_IMAGE_DIR / "manifest.json").read_text())["initrd"]["compression"]
    config = boot.bench_config(argparse.Namespace(machine="q35", sharefs="virtiofs"))
    initrd = floor.build_floor(boot.FLOOR_DIR, compression, kernel_build.default_cache())
    config.vm = dataclasses.replace(config.vm, image="initrd", initrd=initrd)
    timeline = asyncio.run(boot.boot_once(config, "floor"))
    return {"floor_s": round(timeline.agent_ready_s, 3), "floor_qemu_cpu": timeline.qemu_cpu_s}


def _info(bench: Bench, sid: str) -> dict:
    return dict(bench.cri.controller.Status(sb.ControllerStatusRequest(sandbox_id=sid, verbose=True),
                                            metadata=demo.NAMESPACE, timeout=30).info)


def _spans(bench: Bench, sid: str) -> dict:
    info = _info(bench, sid)
    restore = json.loads(info.get("boot_restore") or "{}")
    spans = {"pod_prepare": float(info["pod_prepare_s"]), "before_qemu": float(info["before_qemu_s"]),
             "template_get": restore.get("template_s"), "ram_copy": restore.get("ram_copy_s"),
             "restored_running": restore.get("running_s"), "devices_hot_plugged": restore.get("devices_added_s"),
             "agent_answers": float(info["boot_agent_ready_s"]), "clock_synced": restore.get("clock_synced_s"),
             "check": float(info["check_s"]) if "check_s" in info else None,
             "setup_sandbox": float(info["setup_sandbox_s"]),
             "guest_network": float(info.get("guest_network_s", "nan")),
             "port_forward": float(info.get("port_forward_s", "nan")),
             "after_ready_total": float(info["setup_after_ready_s"]),
             "start_total": float(info["start_total_s"]),
             "qemu_cpu_restored": restore.get("running_cpu_s"), "qemu_cpu_agent_answers": float(info["boot_qemu_cpu_s"]),
             "qemu_cpu": float(info["start_qemu_cpu_s"])}
    console = (bench.daemon.state / sid / "console.log").read_text(errors="replace")
    if (found := SETUP_LINE.search(console)) is not None:
        spans.update(zip(("guest_reseed", "guest_share_mount", "guest_namespaces", "guest_files"),
                         map(float, found.groups())))
    return spans


def run(runs: int, parallel: int) -> dict:
    bench = Bench(MODES["template"])
    try:
        bench.start_pods(["warm"])
        bench.remove_pods(["warm"])
        singles = []
        for run_index in range(runs):
            sid = f"one{run_index}"
            yardstick = _floor_boot()
            wall, cpu = _timed_start(bench, [sid])
            spans = _spans(bench, sid)
            singles.append({"wall": round(wall, 3), **yardstick,
                            "start_to_floor": round(spans["start_total"] / yardstick["floor_s"], 3),
                            "host_cpu": cpu, **spans})
            bench.remove_pods([sid])
        ids = [f"five{i}" for i in range(parallel)]
        wall, many_host_cpu = _timed_start(bench, ids)
        many = [_spans(bench, sid) for sid in ids]
        bench.remove_pods(ids)
    finally:
        bench.close()
    one_wall = statistics.median(s["wall"] for s in singles)
    one_cpu = statistics.median(s["qemu_cpu"] for s in singles)
    many_cpu = [s["qemu_cpu"] for s in many]
    cores = os.cpu_count() or 1
    floor_s = statistics.median(s["floor_s"] for s in singles)
    return {"load_avg": os.getloadavg(), "singles": singles, "parallel": {"wall": round(wall, 3), "host_cpu": many_host_cpu, "pods": many},
            "summary": {"floor_s": floor_s, "start_to_floor": statistics.median(s["start_to_floor"] for s in singles),
                        "one_wall_s": one_wall, "one_qemu_cpu_s": one_cpu, "parallel_wall_s": round(wall, 3),
                        "parallel_qemu_cpu_s": many_cpu, "ratio": round(wall / one_wall, 2),
                        "cpu_floor_ratio": round(parallel * statistics.median(many_cpu) / cores / one_wall, 2)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=5)
    args = parser.parse_args()
    began = time.time()
    result = run(args.runs, args.parallel)
    result["seconds"] = round(time.time() - began, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
