"""Task benchmark of the agent in dev mode (root, real crun), printed as one JSON object:

- create+start latency through the agent (Create + Start over ttrpc) against `crun run -d` on
  the same bundle, and against `crun create` + `crun start` (the two runtime calls the Task
  API's two RPCs need), median/min/max over --runs interleaved runs, and the ratios (target
  <= 1.2 against `crun run -d`);
- the agent's memory (Pss_Anon and Pss from /proc/PID/smaps_rollup) idle and with 10 running
  containers;
- the agent's import time at start (`python -X importtime`): total and the slowest imports.

    python -m bench.agent_task [--runs 10] [--containers 10]

Dev mode runs the agent as CPython on the host; in the guest it is the Nuitka build, whose
memory figures the boot benchmark's image reports.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmm_common import ttrpc
from vmm_common.protos.containerd.task.v2 import shim_pb2 as pb

TASK = "containerd.task.v2.Task"
REPO = Path(__file__).resolve().parents[1]


def busybox_bundle(path: Path, args: list[str]) -> Path:
    """crun's default spec running `args` over a rootfs of busybox-static and its applets."""
    # `busybox --install -s` links to the binary's real path (/usr/bin/busybox on merged-/usr
    # hosts): put the copy there inside the rootfs too
    real = Path(os.path.realpath("/bin/busybox"))
    inside = path / "rootfs" / real.relative_to("/")
    inside.parent.mkdir(parents=True)
    shutil.copy2(real, inside)
    bin_dir = path / "rootfs" / "bin"
    bin_dir.mkdir(exist_ok=True)
    subprocess.run([str(real), "--install", "-s", str(bin_dir)], check=True)
    subprocess.run(["crun", "spec", "-b", str(path)], check=True)
    spec = json.loads((path / "config.json").read_text())
    spec["process"].update(terminal=False, args=args)
    (path / "config.json").write_text(json.dumps(spec))
    return path


def smaps_rollup(pid: int) -> dict[str, float]:
    """Pss and Pss_Anon of `pid` in MiB."""
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Pss", "Pss_Anon"):
                values[key] = round(int(rest.split()[0]) / 1024, 2)
    return values


def import_summary(stderr_text: str, top: int = 8) -> dict:
    """Total self time and the slowest cumulative imports from -X importtime output."""
    rows = []
    for line in stderr_text.splitlines():
        if line.startswith("import time:") and "|" in line and "self [us]" not in line:
            own, cumulative, name = line[len("import time:"):].split("|", 2)
            rows.append((int(own), int(cumulative), name.rstrip()))
    top_level = [r for r in rows if not r[2].startswith("  ")]
    return {"total_ms": round(sum(r[0] for r in rows) / 1000, 1), "modules": len(rows),
            "slowest_top_level_ms": {r[2].strip(): round(r[1] / 1000, 1)
                                     for r in sorted(top_level, key=lambda r: -r[1])[:top]}}


class DevAgent:
    def __init__(self, workdir: Path):
        self.socket = workdir / "agent.sock"
        self.stderr_path = workdir / "agent.err"
        self._stderr = open(self.stderr_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "vmm_task", "--listen",
             f"unix://{self.socket}", "--run-dir", str(workdir / "run"), "--runtime", "crun"],
            stdout=subprocess.PIPE, stderr=self._stderr, cwd=REPO)
        ready = self.process.stdout.readline().decode()
        if "vmm-task ready" not in ready:
            raise RuntimeError(f"agent did not start: {self.stderr_path.read_text()[-2000:]}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self._stderr.close()


async def create_start(client: ttrpc.Client, cid: str, bundle: Path) -> float:
    started = time.perf_counter()
    await client.call(TASK, "Create", pb.CreateTaskRequest(id=cid, bundle=str(bundle)),
                      pb.CreateTaskResponse, timeout=30)
    await client.call(TASK, "Start", pb.StartRequest(id=cid), pb.StartResponse, timeout=30)
    return time.perf_counter() - started


async def remove(client: ttrpc.Client, cid: str) -> None:
    from google.protobuf import empty_pb2
    await client.call(TASK, "Kill", pb.KillRequest(id=cid, signal=9, all=True), empty_pb2.Empty)
    await client.call(TASK, "Wait", pb.WaitRequest(id=cid), pb.WaitResponse, timeout=30)
    await client.call(TASK, "Delete", pb.DeleteRequest(id=cid), pb.DeleteResponse)


def crun_direct(root: Path, cid: str, bundle: Path, two_steps: bool) -> float:
    """`crun run -d`, or (two_steps) `crun create` + `crun start` as the Task API needs."""
    crun = ["crun", "--root", str(root)]
    steps = ([crun + ["create", "--bundle", str(bundle), cid], crun + ["start", cid]] if two_steps
             else [crun + ["run", "-d", "--bundle", str(bundle), cid]])
    started = time.perf_counter()
    for step in steps:
        subprocess.run(step, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    subprocess.run(crun + ["delete", "--force", cid], check=True)
    return elapsed


def spread(samples: list[float]) -> dict:
    ms = [s * 1000 for s in samples]
    return {"median_ms": round(statistics.median(ms), 2), "min_ms": round(min(ms), 2),
            "max_ms": round(max(ms), 2)}


async def measure(agent: DevAgent, workdir: Path, runs: int, containers: int) -> dict:
    bundle = busybox_bundle(workdir / "bundle", ["sleep", "1000"])
    client = await ttrpc.Client.connect_unix(str(agent.socket))
    try:
        idle = smaps_rollup(agent.process.pid)
        via_agent, via_run, via_two = [], [], []
        for i in range(runs):
            via_agent.append(await create_start(client, f"bench-agent-{i}", bundle))
            await remove(client, f"bench-agent-{i}")
            for samples, two_steps in ((via_run, False), (via_two, True)):
                samples.append(await asyncio.to_thread(
                    crun_direct, workdir / "crun-root", f"bench-crun-{i}", bundle, two_steps))
        ids = [f"bench-many-{i}" for i in range(containers)]
        for cid in ids:
            await create_start(client, cid, bundle)
        loaded = smaps_rollup(agent.process.pid)
        for cid in ids:
            await remove(client, cid)
    finally:
        await client.close()
    agent_ms, run_ms, two_ms = spread(via_agent), spread(via_run), spread(via_two)
    return {
        "create_start": {"agent": agent_ms, "crun_run_d": run_ms, "crun_create_then_start": two_ms,
                         "runs": runs,
                         "ratio_median": round(agent_ms["median_ms"] / run_ms["median_ms"], 3),
                         "ratio_median_vs_create_then_start":
                             round(agent_ms["median_ms"] / two_ms["median_ms"], 3),
                         "target_ratio": 1.2},
        "memory_mib": {"idle": idle, f"with_{containers}_containers": loaded,
                       "target_idle_pss_anon": 12},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--containers", type=int, default=10)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.agent_task runs containers: root needed", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="bench-task-"))
    agent = DevAgent(workdir)
    try:
        result = asyncio.run(measure(agent, workdir, args.runs, args.containers))
    finally:
        agent.stop()
    result["agent_imports"] = import_summary(agent.stderr_path.read_text(errors="replace"))
    result["mode"] = "dev (CPython on the host)"
    print(json.dumps(result))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
