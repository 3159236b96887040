"""The benchmark report: samples in, build/bench/report.json and report.md out.

Keys are dotted paths ("boot.ready_s") that become nested objects. A measured number becomes
{"median", "min", "max", "n"} over its samples; exact facts (sizes, booleans) stay plain values.
The markdown table lists every key of REQUIRED_KEYS (a missing one shows as "missing", so a
failed benchmark cannot pass unnoticed) and the published anchors it is compared with.
"""
from __future__ import annotations

import statistics

REQUIRED_KEYS = (
    "image.initrd_bytes", "image.kernel_bytes", "image.agent_bytes",
    "boot.ready_s", "boot.floor_s", "boot.ratio", "boot.python_floor_s", "boot.python_floor_ratio",
    "agent.anon_idle_kb", "agent.anon_10_containers_kb", "agent.pss_idle_kb",
    "guest.mem_used_kb", "guest.mem_used_floor_kb",
    "sandboxer.pss_kb.1", "sandboxer.pss_kb.5", "sandboxer.pss_kb.10",
    "sandboxer.daemon_pss_kb.1", "sandboxer.daemon_pss_kb.5", "sandboxer.daemon_pss_kb.10",
    "sandboxer.daemon_anon_kb.1", "sandboxer.daemon_anon_kb.5", "sandboxer.daemon_anon_kb.10",
    "pod.start_s_single", "pod.start_s_parallel_5",
    "rpc.check_p50_ms", "rpc.check_p99_ms",
    "io.stdout_mb_s", "io.stdout_integrity",
    # per boot mode (vm.image, vm.template: bench.boot.MODES; the keys above are the default mode's)
    *(f"{group}.{mode}.{name}" for mode in ("initrd", "pmem", "template")
      for group, name in (("boot", "ready_s"), ("boot", "ratio"), ("pod", "start_s_single"),
                          ("pod", "start_s_parallel_5"), ("guest", "mem_used_kb"))),
    "host.per_pod_kb.1", "host.per_pod_kb.10", "host.per_pod_kb.30", "host.tcg_cache_kb",
)

# Published figures the report is read against: (what, figure, source).
ANCHORS = (
    ("Kata: host memory per pod in shims (containerd-shim-kata-v2 Pss)", "~18 MB per pod",
     "Kuasar benchmark, https://github.com/kuasar-io/kuasar/blob/main/tests/benchmark/Benchmark.md"
     " and https://kuasar.io/blog/benchmark-test-report"),
    ("Kata: host memory per pod (shim + QEMU + virtiofsd Pss, KVM)", "~123 MB per pod",
     "Kata Containers CI memory-footprint metrics on QEMU, as cited in issue 15 (not re-checked here)"),
    ("Kata: guest initrd", "14-28 MB",
     "Kata Containers release artifacts (kata-containers-initrd), https://github.com/kata-containers/kata-containers/releases"),
    ("Kuasar: vmm-sandboxer Pss at 50 pods", "~15 MB",
     "Kuasar benchmark, https://github.com/kuasar-io/kuasar/blob/main/tests/benchmark/Benchmark.md"),
    ("Kuasar: tailored guest kernel", "3.5 MB",
     "Kuasar, how to tailor the guest kernel, https://github.com/kuasar-io/kuasar/blob/main/vmm/scripts/kernel/build-kernel/how-to-tailor-linux-kernel-for-kuasar-security-container.md"),
)

UNITS = (("_mb_s", "MB/s"), ("_bytes", "bytes"), ("_kb", "kB"), ("_ms", "ms"), ("_s", "s"))


def spread(samples: list[float]) -> dict:
    """Median, min, max and count of the samples (which must not be empty)."""
    if not samples:
        raise ValueError("spread of no samples")
    return {"median": round(statistics.median(samples), 3), "min": round(min(samples), 3),
            "max": round(max(samples), 3), "n": len(samples)}


def set_path(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def get_path(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def build(samples: dict[str, list[float]], exact: dict, machine: dict,
          errors: dict[str, str] | None = None) -> dict:
    """The report object: samples summarised by spread(), exact values as they are, the machine
    and date, errors by benchmark, and the required keys that have no value."""
    report: dict = {"machine": machine}
    for key, values in samples.items():
        if values:
            set_path(report, key, spread(values))
    for key, value in exact.items():
        set_path(report, key, value)
    report["errors"] = dict(errors or {})
    report["missing"] = [k for k in REQUIRED_KEYS if get_path(report, k) is None]
    return report


def _unit(key: str) -> str:
    leaf = key.split(".")
    name = leaf[-2] if leaf[-1].isdigit() else leaf[-1]
    return next((unit for suffix, unit in UNITS if name.endswith(suffix) or f"{suffix}_" in name), "")


def _cells(value) -> list[str]:
    if value is None:
        return ["missing", "", "", ""]
    if isinstance(value, dict):
        return [f"{value['median']:g}", f"{value['min']:g}", f"{value['max']:g}", str(value["n"])]
    if isinstance(value, bool):
        return [str(value).lower(), "", "", ""]
    return [f"{value:g}" if isinstance(value, float) else str(value), "", "", ""]


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        "# vmm-task benchmark report",
        "",
        f"{machine.get('date', '?')} · {machine.get('cores', '?')} cores · accel "
        f"{machine.get('accel', '?')} · load average at start {machine.get('load_avg_start', '?')}"
        f" · runs {machine.get('runs', '?')} · command `{machine.get('command', 'make bench')}`",
        "",
        "| key | median | min | max | n | unit |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for key in REQUIRED_KEYS:
        lines.append("| " + " | ".join([f"`{key}`", *_cells(get_path(report, key)), _unit(key)]) + " |")
    if source := get_path(report, "agent.source"):
        lines += ["", f"`agent.*`: Pss_Anon and Pss from {source}."]
    lines += ["", "Published anchors:", "", "| what | figure | source |", "|---|---|---|"]
    lines += [f"| {what} | {figure} | {source} |" for what, figure, source in ANCHORS]
    if report.get("errors"):
        lines += ["", "Benchmarks that failed:", ""]
        lines += [f"- {name}: {text}" for name, text in report["errors"].items()]
    return "\n".join(lines) + "\n"
