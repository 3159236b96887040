"""The daemon as containerd's CRI drives it (scripts/demo.py's client): pod start times, the
daemon's own memory with 1/5/10 pods, and container stdout through the whole stack.

    python -m bench.sandboxer [--runs 1] [--stdout-mib 100]

Per run, against one vmm-sandboxer process (real QEMU, TCG here), every pod networked as a CRI
pod is (a veth in a network namespace of its own, as the CNI leaves it: bench/netpair.py), so the
daemon's memory includes the network plumbing (pyroute2) and the start times its attach:
  1. one pod: Controller.Create+Start timed (`single_s`); the daemon's Pss with it; removed;
  2. five pods started at once from five threads: wall time until all five are ready
     (`parallel_5_s`); Pss with 5; five more at once; Pss with 10 pods;
  3. in one of them, a container `cat`s a random file of --stdout-mib MiB from its rootfs to a
     stdout FIFO that this process reads: sha256 and size compared with the file; the rate is the
     size over (that container's Create..Delete) minus (the same for a container that prints
     nothing), i.e. the transfer alone (the rootfs read over virtiofs included);
  4. the daemon killed (-9) with the 10 pods and started again: seconds until its Controller
     answers (`restart.controller_s`) and until every pod is SANDBOX_READY (`all_ready_s`);
  5. every pod removed.
Pss (/proc/PID/smaps_rollup) of the daemon process alone, and with its helper processes (the
hybrid vsock backend and the task relay, which run apart from the daemon so VMs and containerd's
task connections outlive a daemon restart); QEMU and virtiofsd are not counted; the daemon's
Pss_Anon; the task relay's own Pss. Prints one JSON object.

    python -m bench.sandboxer --pod-starts MODE [--runs 1]   # initrd | pmem | template (bench.boot.MODES)
    python -m bench.sandboxer --per-pod 1,10,30

--pod-starts: one pod, then five at once, with the daemon booting guests from MODE.
--per-pod: host memory per pod with N pods running: the Pss of every pod's QEMU and virtiofsd,
plus the daemon's and its helpers', over N; QEMU's TCG translation cache (its anonymous rwx
mapping; a KVM host has none) counted apart.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.netpair import NetnsPair
from host_sandboxer.taskproxy.mounts import unmount_all_under
from host_sandboxer.vmm.template import TemplateStore
from scripts import demo
from vmm_common.protos.containerd.services.sandbox.v1 import sandbox_pb2 as sb

BOOT_TIMEOUT_S = 300.0  # five TCG guests booting at once on a loaded 2-core host
MiB = 1 << 20
POD_EXES = ("qemu-system", "virtiofsd")  # the processes each pod has of its own


def pss_kb(pid: int, field: str = "Pss") -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/smaps_rollup")


def qemu_pss_kb(smaps: str) -> tuple[int, int]:
    """(Pss of all mappings, Pss of TCG's translation cache: the anonymous rwx mapping) in kB."""
    total = tcg = 0
    in_tcg = False
    for line in smaps.splitlines():
        fields = line.split()
        if fields and not fields[0].endswith(":"):  # range perms offset dev inode [name]
            in_tcg = fields[1].startswith("rwx") and len(fields) == 5
        elif fields and fields[0] == "Pss:":
            total += int(fields[1])
            tcg += int(fields[1]) if in_tcg else 0
    return total, tcg


def children(pid: int) -> list[tuple[str, int]]:
    """(executable name, pid) of each child process of `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            exe = os.path.basename(os.readlink(f"/proc/{entry}/exe"))
        except OSError:
            continue
        if f"\nPPid:\t{pid}\n" in status:
            found.append((exe, int(entry)))
    return found


def helpers_of(pid: int) -> list[int]:
    """The daemon's child processes other than VMMs and virtiofsd (the hybrid vsock backend
    process): host memory of the sandboxer that a per-pod figure must count."""
    return [child for exe, child in children(pid) if not exe.startswith(POD_EXES)]


class Bench:
    """One daemon on a private socket and state dir, a CRI-like client, a busybox lower layer."""

    def __init__(self, vm_fields: dict | None = None):
        """`vm_fields`: [vm] keys for every pod (a boot mode of bench.boot.MODES; None: the default)."""
        self.work = Path(tempfile.mkdtemp(prefix="bsb-"))  # short: unix socket paths
        self.daemon = demo.Daemon(self.work)
        text = self.daemon.config.read_text()
        vm = f"boot_timeout_s = {BOOT_TIMEOUT_S}" + "".join(f"\n{key} = {json.dumps(value)}"
                                                             for key, value in (vm_fields or {}).items())
        self.daemon.config.write_text(text.replace("boot_timeout_s = 60.0", vm))
        self.daemon.start()
        self.cri = demo.Cri(self.daemon.socket)
        self.lower = demo.busybox_tree()
        self.started: dict[str, object] = {}
        self.netns: dict[str, NetnsPair] = {}

    def _netns(self, sid: str) -> str:
        """A network namespace for pod `sid` with a veth in it, as the CNI leaves it."""
        self.netns[sid] = NetnsPair().__enter__()
        return self.netns[sid].pod_path

    def start_pods(self, ids: list[str]) -> float:
        """Start the pods at once (one thread each); seconds until the last is ready."""
        netns = {sid: self._netns(sid) for sid in ids}  # the CNI's work, before the clock starts
        begin = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(ids)) as pool:
            responses = pool.map(lambda sid: self.cri.run_pod(
                sid, timeout=BOOT_TIMEOUT_S, netns_path=netns[sid]), ids)
            self.started.update(zip(ids, responses))
        return time.perf_counter() - begin

    def remove_pods(self, ids: list[str]) -> None:
        for sid in ids:
            self.cri.remove_pod(sid)
            del self.started[sid]
            self.netns.pop(sid).close()

    def pss_kb(self) -> dict:
        """{"daemon": its own Pss, "with_helpers": plus its helper processes', "daemon_anon": its
        own Pss_Anon (the part that does not move with how many other processes share its files),
        "task_relay": the relay's own Pss}."""
        pid = self.daemon.proc.pid
        own = pss_kb(pid)
        relay = json.loads((self.daemon.state / "task-relay.json").read_text())["pid"]
        return {"daemon": own, "with_helpers": own + sum(pss_kb(p) for p in helpers_of(pid)),
                "daemon_anon": pss_kb(pid, "Pss_Anon"), "task_relay": pss_kb(relay)}

    def host_kb(self) -> dict:
        """Pss (kB) of the pods' QEMUs (their TCG translation cache apart) and virtiofsds, and of
        the daemon with its helpers."""
        pid = self.daemon.proc.pid
        totals = {"qemu": 0, "tcg_cache": 0, "virtiofsd": 0,
                  "daemon_with_helpers": self.pss_kb()["with_helpers"]}
        for exe, child_pid in children(pid):
            if not exe.startswith(POD_EXES):
                continue
            if exe.startswith("virtiofsd"):
                totals["virtiofsd"] += pss_kb(child_pid)
            else:
                whole, tcg = qemu_pss_kb(Path(f"/proc/{child_pid}/smaps").read_text())
                totals["qemu"] += whole - tcg
                totals["tcg_cache"] += tcg
        return totals

    def restart(self) -> dict:
        """kill -9 the daemon with its pods running and start it again: seconds until the
        Controller answers, and until every pod is ready."""
        self.daemon.proc.kill()
        self.daemon.proc.wait()
        begin = time.perf_counter()
        self.daemon.start(timeout=120)
        answering = time.perf_counter() - begin

        def state(sid):
            return self.cri.controller.Status(sb.ControllerStatusRequest(sandbox_id=sid),
                                              metadata=demo.NAMESPACE, timeout=30).state

        while any(state(sid) != "SANDBOX_READY" for sid in self.started):
            time.sleep(0.05)
        return {"pods": len(self.started), "controller_s": round(answering, 3),
                "all_ready_s": round(time.perf_counter() - begin, 3)}

    def container(self, sid: str, cid: str, args: list[str], payload: int = 0):
        """Run one container in pod `sid`; (seconds Create..Delete, stdout, stderr, status,
        sha256 of the random `payload` bytes put at /payload in its rootfs)."""
        bundle = demo.Bundle(self.work / "bundles", cid,
                             demo.cri_spec(args, cid, self.started[sid].pid), self.lower)
        digest = hashlib.sha256()
        with open(bundle.path / "upper" / "payload", "wb") as f:
            for _ in range(payload // MiB):
                chunk = os.urandom(MiB)
                digest.update(chunk)
                f.write(chunk)
        tasks = demo.Cri.task_client(self.started[sid].address)
        begin = time.perf_counter()
        out, err, status = demo.run_container(tasks, bundle, timeout=600)
        elapsed = time.perf_counter() - begin
        shutil.rmtree(bundle.path, ignore_errors=True)
        return elapsed, out, err, status, digest.hexdigest()

    def stdout_transfer(self, sid: str, run: int, mib: int) -> dict:
        empty_s, *_ = self.container(sid, f"empty{run}", ["true"])
        full_s, out, err, status, sha = self.container(sid, f"cat{run}", ["cat", "/payload"],
                                                        mib * MiB)
        intact = status == 0 and len(out) == mib * MiB and hashlib.sha256(out).hexdigest() == sha
        return {"bytes": mib * MiB, "received_bytes": len(out), "exit_status": status,
                "stderr": err.decode(errors="replace")[-500:], "integrity": intact,
                "seconds": round(full_s - empty_s, 3),
                "mb_s": round(len(out) / 1e6 / max(full_s - empty_s, 1e-3), 2)}

    def close(self) -> None:
        for sid in list(self.started):
            try:
                self.cri.remove_pod(sid)
            except Exception:  # noqa: BLE001 - best effort on the way out of a failed run
                pass
        for pair in self.netns.values():
            pair.close()
        self.daemon.stop()
        self.daemon.remove_cgroups()
        shutil.rmtree(TemplateStore(self.daemon.state).ram_dir, ignore_errors=True)  # vm.template's RAM
        unmount_all_under(self.work)
        shutil.rmtree(self.work, ignore_errors=True)


def run_once(bench: Bench, run: int, stdout_mib: int) -> dict:
    single = bench.start_pods([f"s{run}"])
    pss = {"1": bench.pss_kb()}
    bench.remove_pods([f"s{run}"])
    first, second = [f"a{run}-{i}" for i in range(5)], [f"b{run}-{i}" for i in range(5)]
    parallel = bench.start_pods(first)
    pss["5"] = bench.pss_kb()
    bench.start_pods(second)
    pss["10"] = bench.pss_kb()
    stdout = bench.stdout_transfer(first[0], run, stdout_mib)
    restart = bench.restart()
    bench.remove_pods(first + second)
    return {"single_s": round(single, 3), "parallel_5_s": round(parallel, 3), "pss_kb": pss,
            "stdout": stdout, "restart": restart}


def pod_starts(mode: str, runs: int) -> dict:
    """Seconds to start one pod, and five at once, in boot `mode` (bench.boot.MODES). Templates:
    the node's template is built by a first pod, not counted."""
    from bench.boot import MODES
    bench = Bench(MODES[mode])
    try:
        if MODES[mode].get("template"):
            bench.start_pods(["warm"])
            bench.remove_pods(["warm"])
        single, parallel = [], []
        for run in range(runs):
            single.append(round(bench.start_pods([f"s{run}"]), 3))
            bench.remove_pods([f"s{run}"])
            five = [f"p{run}-{i}" for i in range(5)]
            parallel.append(round(bench.start_pods(five), 3))
            bench.remove_pods(five)
        return {"mode": mode, "single_s": single, "parallel_5_s": parallel}
    finally:
        bench.close()


def per_pod(counts: list[int], batch: int = 5) -> dict:
    """Host kB per pod with each count of pods running (started `batch` at a time): QEMU (without
    its TCG cache) + virtiofsd + the daemon and its helpers, over the pods; the TCG cache per pod."""
    bench = Bench()
    try:
        result = {}
        running = 0
        for count in sorted(counts):
            while running < count:
                ids = [f"m{i}" for i in range(running, min(count, running + batch))]
                bench.start_pods(ids)
                running += len(ids)
            time.sleep(2.0)  # the last guests settle (free page reporting, lazy work)
            host = bench.host_kb()
            result[str(count)] = {
                "per_pod_kb": round((host["qemu"] + host["virtiofsd"] + host["daemon_with_helpers"]) / count),
                "tcg_cache_kb": round(host["tcg_cache"] / count), "totals_kb": host}
        return result
    finally:
        bench.close()


def run(runs: int, stdout_mib: int) -> dict:
    bench = Bench()
    try:
        return {"runs": [run_once(bench, i, stdout_mib) for i in range(runs)]}
    finally:
        bench.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--stdout-mib", type=int, default=100)
    parser.add_argument("--pod-starts", choices=["initrd", "pmem", "template"], default=None, metavar="MODE")
    parser.add_argument("--per-pod", default=None, metavar="N,N,...")
    args = parser.parse_args()
    if args.pod_starts:
        print(json.dumps(pod_starts(args.pod_starts, args.runs)))
    elif args.per_pod:
        print(json.dumps(per_pod([int(n) for n in args.per_pod.split(",")])))
    else:
        print(json.dumps(run(args.runs, args.stdout_mib)))


if __name__ == "__main__":
    main()
