"""Task benchmark of the agent (root, real crun), printed as one JSON object:

- create+start latency through the agent (Create + Start over ttrpc) against `crun run -d` on
  the same bundle, and against `crun create` + `crun start` (the two runtime calls the Task
  API's two RPCs need), median/min/max over --runs interleaved runs, and the ratios (target
  <= 1.2 against `crun run -d`);
- the agent's memory (Pss_Anon and Pss from /proc/PID/smaps_rollup) idle and with 10 running
  containers;
- the agent's import time until it is ready (`python -X importtime`, dev mode): total and the
  slowest imports.

    python -m bench.agent_task [--runs 20] [--containers 10] [--vm]

Default: the agent in dev mode (CPython on this host, `--runs` containers of `true`). `--vm`: the
Nuitka agent as PID 1 of the guest image (`make guest-image`), bundles on the shared directory;
the issue's memory targets are about this one.
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


def busybox_bundle(path: Path, args: list[str], own_pid_namespace: bool = True) -> Path:
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
    if not own_pid_namespace:
        spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"]
                                       if ns["type"] != "pid"]
    (path / "config.json").write_text(json.dumps(spec))
    return path


MEMORY_KEYS = ("Rss", "Pss", "Pss_Anon", "Pss_File")


def smaps_rollup(text: str) -> dict[str, float]:
    """Rss, Pss, Pss_Anon and Pss_File in MiB from the text of /proc/PID/smaps_rollup."""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in MEMORY_KEYS:
            values[key] = round(int(rest.split()[0]) / 1024, 2)
    if "Pss_Anon" not in values:
        raise RuntimeError(f"no Pss_Anon in smaps_rollup: {text[:300]!r}")
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
        # what was imported until the agent was ready (later lazy imports are not start cost)
        self.imports_at_start = self.stderr_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self._stderr.close()


async def create_start(client: ttrpc.Client, cid: str, bundle: str) -> float:
    started = time.perf_counter()
    await client.call(TASK, "Create", pb.CreateTaskRequest(id=cid, bundle=bundle),
                      pb.CreateTaskResponse, timeout=60)
    await client.call(TASK, "Start", pb.StartRequest(id=cid), pb.StartResponse, timeout=60)
    return time.perf_counter() - started


async def remove(client: ttrpc.Client, cid: str) -> None:
    from google.protobuf import empty_pb2
    try:
        await client.call(TASK, "Kill", pb.KillRequest(id=cid, signal=9, all=True),
                          empty_pb2.Empty)
    except ttrpc.RpcError as e:
        if e.code != ttrpc.Code.NOT_FOUND:  # NOT_FOUND: it already exited
            raise
    await client.call(TASK, "Wait", pb.WaitRequest(id=cid), pb.WaitResponse, timeout=60)
    await client.call(TASK, "Delete", pb.DeleteRequest(id=cid), pb.DeleteResponse)


def spread(samples: list[float]) -> dict:
    ms = [s * 1000 for s in samples]
    return {"median_ms": round(statistics.median(ms), 2), "min_ms": round(min(ms), 2),
            "max_ms": round(max(ms), 2)}


class Target:
    """Where the agent runs. `bundle(name, args, own_pid_namespace)` lays out a bundle and
    returns its path as the agent sees it; `memory()` reads the agent's smaps_rollup (how:
    `memory_source`); `baselines` time the runtime started directly on a bundle:
    {name: async fn(i, bundle)}."""
    client: ttrpc.Client
    baselines: dict
    memory_source: str

    def bundle(self, name: str, args: list[str], own_pid_namespace: bool = True) -> str:
        raise NotImplementedError

    async def memory(self) -> dict:
        raise NotImplementedError


async def measure(target: Target, runs: int, containers: int) -> dict:
    quick = target.bundle("quick", ["true"])
    idle = await target.memory()
    via_agent, via_direct = [], {name: [] for name in target.baselines}
    for i in range(runs):
        via_agent.append(await create_start(target.client, f"bench-agent-{i}", quick))
        await remove(target.client, f"bench-agent-{i}")
        for name, baseline in target.baselines.items():
            via_direct[name].append(await baseline(i, quick))
    sleeper = target.bundle("sleeper", ["sleep", "1000"])
    ids = [f"bench-many-{i}" for i in range(containers)]
    for cid in ids:
        await create_start(target.client, cid, sleeper)
    loaded = await target.memory()
    for cid in ids:
        await remove(target.client, cid)
    agent_ms = spread(via_agent)
    latency = {"agent_create_then_start": agent_ms, "runs": runs, "target_ratio": 1.2}
    for name, samples in via_direct.items():
        latency[name] = spread(samples)
        latency[f"ratio_median_vs_{name}"] = round(
            agent_ms["median_ms"] / latency[name]["median_ms"], 3)
    return {"create_start": latency,
            "memory_mib": {"idle": idle, f"with_{containers}_containers": loaded,
                           "target_idle_pss_anon": 12, "source": target.memory_source}}


class DevTarget(Target):
    """The agent as CPython on this host; baselines: `crun run -d` and `crun create` + `crun
    start` (the two runtime calls behind the Task API's Create and Start)."""

    memory_source = "/proc/PID/smaps_rollup of the agent process, read by the bench"

    def __init__(self, agent: DevAgent, client: ttrpc.Client, workdir: Path):
        self.agent, self.client, self.workdir = agent, client, workdir
        self.baselines = {"crun_run_d": self._crun(two_steps=False),
                          "crun_create_then_start": self._crun(two_steps=True)}

    def bundle(self, name, args, own_pid_namespace=True):
        return str(busybox_bundle(self.workdir / name, args, own_pid_namespace))

    async def memory(self):
        return smaps_rollup(Path(f"/proc/{self.agent.process.pid}/smaps_rollup").read_text())

    def _crun(self, two_steps: bool):
        async def run(i: int, bundle: str) -> float:
            return await asyncio.to_thread(self._crun_direct, f"bench-crun-{i}", bundle, two_steps)
        return run

    def _crun_direct(self, cid: str, bundle: str, two_steps: bool) -> float:
        crun = ["crun", "--root", str(self.workdir / "crun-root")]
        steps = ([crun + ["create", "--bundle", bundle, cid], crun + ["start", cid]] if two_steps
                 else [crun + ["run", "-d", "--bundle", bundle, cid]])
        started = time.perf_counter()
        for step in steps:
            subprocess.run(step, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        elapsed = time.perf_counter() - started
        subprocess.run(crun + ["delete", "--force", cid], check=True)
        return elapsed


class VmTarget(Target):
    """The Nuitka agent as PID 1 of the guest image (QEMU, TCG here), booted with task.debug.
    Memory: ExecVMProcess runs the host's static busybox from the shared directory to `cat
    /proc/1/smaps_rollup` (a probe container gets /proc/1/status but not smaps_rollup, so
    only RssAnon, an upper bound of Pss_Anon). Baseline: `crun run -d --no-pivot` (the root is an initramfs, as for the
    agent) in the guest through ExecVMProcess (one RPC that returns when crun and the
    container, `true`, are done with its stdout)."""

    GUEST_SHARE = "/run/kuasar/state"
    # The first ExecVMProcess imports vmm_task.capture and shlex into the agent (tens of kB):
    # counted in the idle figure, as in docs/boot-time.md.
    memory_source = "/proc/1/smaps_rollup read by ExecVMProcess (task.debug) with the host's static busybox"

    def __init__(self, guest, client: ttrpc.Client, share: Path):
        self.guest, self.client, self.share = guest, client, share
        self._probes = 0
        self.baselines = {"crun_run_d_via_ExecVMProcess": self._crun_run}

    def bundle(self, name, args, own_pid_namespace=True):
        busybox_bundle(self.share / name, args, own_pid_namespace)
        return f"{self.GUEST_SHARE}/{name}"

    async def memory(self):
        if not (self.share / "busybox").exists():
            shutil.copy("/bin/busybox", self.share / "busybox")
        return smaps_rollup(await self.vm_exec(f"{self.GUEST_SHARE}/busybox cat /proc/1/smaps_rollup"))

    async def vm_exec(self, command: str) -> str:
        """The stdout of `command` run by the agent (ExecVMProcess)."""
        from vmm_common.protos.kuasar import sandbox_pb2
        reply = await self.client.call("grpc.SandboxService", "ExecVMProcess",
                                       sandbox_pb2.ExecVMProcessRequest(command=command),
                                       sandbox_pb2.ExecVMProcessResponse, timeout=60)
        return reply.out

    async def probe(self, script: str, parse):
        """parse(output) of `script` run by a busybox container in the guest's PID namespace
        (so /proc/1 is the agent), once parse finds something in it."""
        self._probes += 1
        name = f"probe{self._probes}"
        bundle = self.bundle(name, ["sh", "-c", script], own_pid_namespace=False)
        await self.client.call(TASK, "Create", pb.CreateTaskRequest(
            id=name, bundle=bundle, stdout=f"{bundle}/out"), pb.CreateTaskResponse, timeout=60)
        await self.client.call(TASK, "Start", pb.StartRequest(id=name), pb.StartResponse)
        # Its end awaited before the delete: `remove` kills at once, which on a slow guest came
        # before the script had printed anything.
        await self.client.call(TASK, "Wait", pb.WaitRequest(id=name), pb.WaitResponse, timeout=60)
        await self.client.call(TASK, "Delete", pb.DeleteRequest(id=name), pb.DeleteResponse)
        for _ in range(50):  # the shared directory may show the write a moment later
            values = parse((self.share / name / "out").read_text())
            if values:
                return values
            await asyncio.sleep(0.1)
        raise RuntimeError(f"probe {name}: nothing found in the output of {script!r}")

    async def _crun_run(self, i: int, bundle: str) -> float:
        crun = "crun --root /run/bench-crun"
        started = time.perf_counter()
        await self.vm_exec(f"{crun} run -d --no-pivot --bundle {bundle} bench-crun-{i}")
        elapsed = time.perf_counter() - started
        await self.vm_exec(f"{crun} delete --force bench-crun-{i}")
        return elapsed


async def run_dev(runs: int, containers: int) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench-task-"))
    agent = DevAgent(workdir)
    try:
        client = await ttrpc.Client.connect_unix(str(agent.socket))
        try:
            result = await measure(DevTarget(agent, client, workdir), runs, containers)
        finally:
            await client.close()
    finally:
        agent.stop()
    result["agent_imports_at_start"] = import_summary(agent.imports_at_start)
    result["mode"] = "dev (CPython on the host)"
    shutil.rmtree(workdir, ignore_errors=True)
    return result


async def run_vm(runs: int, containers: int) -> dict:
    import dataclasses

    from host_sandboxer.config import DEFAULT_IMAGE_DIR, load_config
    from host_sandboxer.vmm.vm import GuestVm

    config = load_config(None)
    config.vm = dataclasses.replace(config.vm, kernel=DEFAULT_IMAGE_DIR / "kernel",
                                    initrd=DEFAULT_IMAGE_DIR / "initrd.img", boot_timeout_s=120.0)
    config.vsock = dataclasses.replace(config.vsock, transport="hybrid")
    workdir = Path(tempfile.mkdtemp(prefix="bench-task-vm-"))
    share = workdir / "share"
    share.mkdir()
    guest = GuestVm(config, workdir / "vm", name="bench-task", share_dir=share,
                    kernel_params=["task.debug"])
    try:
        await guest.start()
        client = await guest.ttrpc_client()
        try:
            result = await measure(VmTarget(guest, client, share), runs, containers)
        finally:
            await client.close()
    finally:
        await guest.close()
        shutil.rmtree(workdir, ignore_errors=True)
    result["mode"] = "vm (Nuitka agent as PID 1, QEMU accel from the config: TCG here)"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--containers", type=int, default=10)
    parser.add_argument("--vm", action="store_true", help="measure the agent in the guest image")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.agent_task runs containers: root needed", file=sys.stderr)
        return 1
    run = run_vm if args.vm else run_dev
    print(json.dumps(asyncio.run(run(args.runs, args.containers))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
