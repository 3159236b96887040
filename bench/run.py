"""`make bench`: every benchmark, one report: build/bench/report.json and build/bench/report.md.

    python -m bench.run [--runs N] [--quick] [--only GROUP ...] [--out DIR]

Groups (the report's top-level keys, and the benchmark behind each):
  image      sizes from build/guest/manifest.json
  boot       bench.boot: QEMU spawn -> ready line, our image vs the busybox and Python floors, interleaved
  agent      bench.agent_task --vm: the agent's memory as PID 1, idle and with 10 containers
  guest      bench.guest_mem: MemTotal - MemAvailable in the guest at idle, ours vs the floor
  rpc        bench.check_rtt: Check round trips over hybrid vsock to a booted guest
  sandboxer  bench.sandboxer: the daemon's Pss with 1/5/10 pods, and the pod and io keys
  pods       bench.sandboxer --pod-starts: pod start, single and five at once, in each boot mode
  host       bench.sandboxer --per-pod: host memory per pod with 1/10/30 pods, TCG cache apart
Keys of a boot mode M (initrd, pmem: vm.image; template: pmem clones, vm.template) are
boot.M.*, pod.M.*, guest.M.*; the
unqualified ones (boot.ready_s, ...) are the default mode's.
Each measured key is {"median", "min", "max", "n"} over the runs (docs/benchmarks.md). A
benchmark that fails is recorded under "errors" and its keys under "missing"; the exit status
is then 1. A partial run (--only) lists the other groups' keys as missing too, says which groups
it did not run, and exits 0 if what it ran produced every key of theirs.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

from bench import agent_task, boot, check_rtt, guest_mem, report, sandboxer
from host_sandboxer.config import DEFAULT_IMAGE_DIR, boot_image, load_config
from host_sandboxer.vmm.accel import resolve_accel

REPO = Path(__file__).resolve().parents[1]
GROUPS = ("image", "boot", "agent", "guest", "rpc", "sandboxer", "pods", "host")
PER_POD_COUNTS = (1, 10, 30)
RPC_CALLS = 300
STDOUT_MIB = 100


def image(runs: int) -> tuple[dict, dict]:
    manifest = json.loads((DEFAULT_IMAGE_DIR / "manifest.json").read_text())
    return {}, {"image.initrd_bytes": manifest["initrd"]["size"],
                "image.rootfs_bytes": manifest["rootfs"]["size"],
                # the bzImage (the README's kernel target); QEMU boots the same kernel's ELF
                "image.kernel_bytes": manifest["kernel"]["bzimage_size"],
                "image.agent_bytes": manifest["agent"]["dist_size"],
                "image.initrd_compression": manifest["initrd"]["compression"]}


def boot_times(runs: int) -> tuple[dict, dict]:
    args = argparse.Namespace(runs=runs, machine="q35", sharefs="virtiofs",
                              compression=json.loads((DEFAULT_IMAGE_DIR / "manifest.json")
                                                     .read_text())["initrd"]["compression"])
    result = asyncio.run(boot.run(args))
    floor = result["floor"]["samples_s"]
    python_floor = result["python_floor"]["samples_s"]
    samples = {"boot.floor_s": floor, "boot.python_floor_s": python_floor,
               "boot.python_floor_ratio": [p / f for p, f in zip(python_floor, floor)]}
    for mode, summary in result["modes"].items():
        samples[f"boot.{mode}.ready_s"] = summary["samples_s"]
        samples[f"boot.{mode}.ratio"] = [a / f for a, f in zip(summary["samples_s"], floor)]
    return {**samples, **_default_mode(samples, "boot", ("ready_s", "ratio"))}, {}


def _default_mode(samples: dict, group: str, names) -> dict:
    """The unqualified keys (`boot.ready_s`) are the default mode's (vm.image)."""
    mode = boot_image(load_config(None).vm)
    return {f"{group}.{name}": samples[f"{group}.{mode}.{name}"] for name in names}


def agent_memory(runs: int) -> tuple[dict, dict]:
    samples = {"agent.anon_idle_kb": [], "agent.anon_10_containers_kb": [], "agent.pss_idle_kb": []}
    for _ in range(runs):
        memory = asyncio.run(agent_task.run_vm(1, 10))["memory_mib"]
        for key, values, field in (("agent.anon_idle_kb", memory["idle"], "Pss_Anon"),
                                   ("agent.anon_10_containers_kb", memory["with_10_containers"], "Pss_Anon"),
                                   ("agent.pss_idle_kb", memory["idle"], "Pss")):
            samples[key].append(round(values[field] * 1024))
    return samples, {"agent.source": memory["source"]}


def guest_memory(runs: int) -> tuple[dict, dict]:
    result = asyncio.run(guest_mem.run(runs, settle_s=2.0))
    samples = {"guest.mem_used_floor_kb": result["used_kb"]["floor"]}
    for mode in boot.MODES:
        samples[f"guest.{mode}.mem_used_kb"] = result["used_kb"][mode]
        samples[f"guest.{mode}.ram_resident_kb"] = result["ram_resident_kb"][mode]
        samples[f"guest.{mode}.ram_resident_no_fpr_kb"] = result["ram_resident_kb"][mode + "_no_fpr"]
    return ({**samples, **_default_mode(samples, "guest", ("mem_used_kb",))},
            {"guest.memory_mib": result["memory_mib"],
             "guest.free_page_reporting": result["free_page_reporting"]})


def rpc(runs: int) -> tuple[dict, dict]:
    results = [asyncio.run(check_rtt.run(calls=RPC_CALLS)) for _ in range(runs)]
    return {"rpc.check_p50_ms": [r["p50_ms"] for r in results],
            "rpc.check_p99_ms": [r["p99_ms"] for r in results]}, {"rpc.calls_per_run": RPC_CALLS}


def daemon(runs: int) -> tuple[dict, dict]:
    results = sandboxer.run(runs, stdout_mib=STDOUT_MIB)["runs"]
    samples = {f"sandboxer.{key}.{n}": [r["pss_kb"][n][part] for r in results]
               for key, part in (("pss_kb", "with_helpers"), ("daemon_pss_kb", "daemon"),
                                 ("daemon_anon_kb", "daemon_anon"))
               for n in ("1", "5", "10")}
    samples["pod.start_s_single"] = [r["single_s"] for r in results]
    samples["pod.start_s_parallel_5"] = [r["parallel_5_s"] for r in results]
    samples["io.stdout_mb_s"] = [r["stdout"]["mb_s"] for r in results]
    failed = [r["stdout"] for r in results if not r["stdout"]["integrity"]]
    exact = {"io.stdout_integrity": not failed, "io.stdout_bytes": results[0]["stdout"]["bytes"]}
    if failed:
        exact["io.stdout_failures"] = failed
    return samples, exact


def pod_modes(runs: int) -> tuple[dict, dict]:
    samples = {}
    for mode in boot.MODES:
        result = sandboxer.pod_starts(mode, runs)
        samples[f"pod.{mode}.start_s_single"] = result["single_s"]
        samples[f"pod.{mode}.start_s_parallel_5"] = result["parallel_5_s"]
    return samples, {}


def host_memory(runs: int) -> tuple[dict, dict]:
    """One run whatever `runs` (30 TCG guests at once are minutes of boot on 2 cores)."""
    result = sandboxer.per_pod(list(PER_POD_COUNTS))
    samples = {f"host.per_pod_kb.{n}": [result[str(n)]["per_pod_kb"]] for n in PER_POD_COUNTS}
    samples["host.tcg_cache_kb"] = [result[str(max(PER_POD_COUNTS))]["tcg_cache_kb"]]
    return samples, {"host.image": boot_image(load_config(None).vm),
                     "host.totals_kb": {str(n): result[str(n)]["totals_kb"] for n in PER_POD_COUNTS}}


BENCHES = {"image": image, "boot": boot_times, "agent": agent_memory, "guest": guest_memory,
           "rpc": rpc, "sandboxer": daemon, "pods": pod_modes, "host": host_memory}


def machine(args, argv: list[str]) -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cores": os.cpu_count(), "accel": resolve_accel(load_config(None).vm.accel).accel,
            "load_avg_start": [round(x, 2) for x in os.getloadavg()],
            "host_kernel": platform.release(), "runs": args.runs,
            "command": " ".join(["python -m bench.run", *argv])}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=None, help="runs per benchmark (default 3)")
    parser.add_argument("--quick", action="store_true", help="one run each: a smoke test")
    parser.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS), metavar="GROUP")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "bench")
    args = parser.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    if os.geteuid() != 0:
        print("bench.run: the benchmarks mount and run containers: root needed", file=sys.stderr)
        return 1
    meta = machine(args, argv)
    samples, exact, errors = {}, {}, {}
    for group in args.only:
        began = time.monotonic()
        print(f"bench: {group} ...", file=sys.stderr, flush=True)
        try:
            got_samples, got_exact = BENCHES[group](args.runs)
        except Exception as exc:  # noqa: BLE001 - one failed benchmark must not hide the others
            errors[group] = f"{type(exc).__name__}: {exc}"
            print(f"bench: {group} failed: {errors[group]}", file=sys.stderr, flush=True)
            continue
        samples.update(got_samples)
        exact.update(got_exact)
        meta.setdefault("seconds", {})[group] = round(time.monotonic() - began, 1)
    meta["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    result = report.build(samples, exact, meta, errors)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "report.md").write_text(report.markdown(result))
    print(report.markdown(result))
    skipped = [g for g in GROUPS if g not in args.only]
    if skipped:
        print(f"bench: not run (their keys show as missing): {' '.join(skipped)}", file=sys.stderr)
    return 1 if errors or failed_keys(result["missing"], args.only) else 0


# The report keys each group produces, by prefix (pod.* comes from two groups).
PRODUCES = {"image": ("image.",), "boot": ("boot.",), "agent": ("agent.",), "guest": ("guest.",),
            "rpc": ("rpc.",), "sandboxer": ("sandboxer.", "pod.start_s_", "io."),
            "pods": tuple(f"pod.{mode}." for mode in boot.MODES), "host": ("host.",)}


def failed_keys(missing: list[str], groups: list[str]) -> list[str]:
    """The missing keys that `groups`, the ones run, should have produced."""
    return [k for k in missing if k.startswith(tuple(p for g in groups for p in PRODUCES[g]))]


if __name__ == "__main__":
    sys.exit(main())
