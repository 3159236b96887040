"""Hybrid vsock benchmark: the project's vhost-user-vsock backend under a real QEMU (TCG) guest.

    python -m bench.vsock [--mib 64] [--extra-vms 4]

The guest is the test-only echo guest (tests/vm/vsock_echo_guest.py: project kernel + a static
C /init with echo/source/sink ports), booted by the real launcher; the backend runs on this
process's event loop thread, as in the daemon. The load comes from a client thread with
blocking sockets, so the loop thread's CPU time is the backend's (plus the launcher's idle QMP
and console reading). Prints one JSON object:
  connect_ms        CONNECT handshake (unix connect -> "OK n") p50/p99
  rtt_ms            64-byte echo round trip p50/p99
  h2g / g2h         MiB/s for --mib MiB, backend (loop thread) CPU s, QEMU CPU s and their ratio
  memory            per additional VM: this process's RssAnon growth, and the Python heap held
                    by host_sandboxer/vsock code (tracemalloc); plus the RSS of a bare Python
                    process importing the backend (the cost of the process-per-VM alternative)
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc

from host_sandboxer.vmm import process
from tests.vm.vsock_echo_guest import (ECHO, SINK, SOURCE_PORT, make_vm, remove_run_dir,
                                       short_run_dir)

MiB = 1 << 20
TRIAL = {"h2g_mib_s": (16, 21), "g2h_mib_s": (9, 10)}   # HYBRID-VSOCK-NOTES.md


def percentiles(samples: list) -> dict:
    ordered = sorted(samples)
    return {"p50": round(statistics.median(ordered), 3),
            "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3)}


def dial(uds_path: str, port: int) -> socket.socket:
    """Blocking hybrid CONNECT from the client thread."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(uds_path)
    sock.sendall(b"CONNECT %d\n" % port)
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            raise ConnectionRefusedError(f"port {port} refused")
        line += byte
    return sock


def status_kib(key: str, pid: str = "self") -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class Bench:
    def __init__(self, loop: asyncio.AbstractEventLoop, vm):
        self.loop = loop
        self.vm = vm
        self.uds = vm.transport.uds_path

    async def loop_cpu(self) -> float:
        return time.thread_time()

    def measure(self, work) -> dict:
        """Runs `work()` in this (client) thread; returns wall, loop-thread CPU and QEMU CPU."""
        pid = self.vm.qemu.proc.pid
        cpu0 = asyncio.run_coroutine_threadsafe(self.loop_cpu(), self.loop).result()
        q0, t0 = process.cpu_seconds(pid), time.monotonic()
        work()
        wall = time.monotonic() - t0
        cpu1 = asyncio.run_coroutine_threadsafe(self.loop_cpu(), self.loop).result()
        backend, qemu = cpu1 - cpu0, process.cpu_seconds(pid) - q0
        return {"wall_s": round(wall, 3), "backend_cpu_s": round(backend, 3), "qemu_cpu_s": round(qemu, 3),
                "backend_over_qemu": round(backend / qemu, 3) if qemu else None}

    def connect_ms(self, runs: int = 50) -> dict:
        samples = []
        for _ in range(runs):
            t = time.perf_counter()
            sock = dial(self.uds, ECHO)
            samples.append((time.perf_counter() - t) * 1000)
            sock.close()
        return percentiles(samples)

    def rtt_ms(self, runs: int = 500) -> dict:
        sock = dial(self.uds, ECHO)
        msg, samples = b"x" * 64, []
        for _ in range(runs):
            t = time.perf_counter()
            sock.sendall(msg)
            got = b""
            while len(got) < len(msg):
                got += sock.recv(64)
            samples.append((time.perf_counter() - t) * 1000)
        sock.close()
        return percentiles(samples)

    def host_to_guest(self, size: int) -> dict:
        chunk = os.urandom(MiB)
        result = {}

        def work():
            sock = dial(self.uds, SINK)
            for _ in range(size // MiB):
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
            result["count"] = int.from_bytes(sock.recv(8), "little")
            sock.close()
        out = self.measure(work)
        assert result["count"] == size, result
        out["mib_s"] = round(size / MiB / out["wall_s"], 1)
        return out

    def guest_to_host(self, size: int) -> dict:
        def work():
            sock = dial(self.uds, SOURCE_PORT)
            sock.sendall(size.to_bytes(8, "little"))
            buf, got = bytearray(MiB), 0
            while True:
                n = sock.recv_into(buf)
                if not n:
                    break
                got += n
            sock.close()
            assert got == size, got
        out = self.measure(work)
        out["mib_s"] = round(size / MiB / out["wall_s"], 1)
        return out


async def boot(index: int):
    run_dir = short_run_dir()
    vm = make_vm(run_dir, name=f"bench-vsock-{index}")
    await vm.start()
    return vm, run_dir


async def touch(vm) -> None:
    """One echo so the VM's device has started, seen traffic and touched its rings."""
    reader, writer = await vm.open_connection(ECHO)
    writer.write(b"warm")
    await reader.readexactly(4)
    writer.close()


def python_process_rss_kib() -> int:
    """RSS of a bare Python process with the backend imported: a process-per-VM floor."""
    code = ("import host_sandboxer.vsock.hybrid, time; "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS')][0])")
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                              text=True).stdout)


async def memory_per_vm(first, extra: int) -> dict:
    await touch(first)
    tracemalloc.start()
    base_heap = _vsock_heap()
    base_anon = status_kib("RssAnon")
    vms = []
    try:
        for i in range(extra):
            vms.append(await boot(i + 1))
        for vm, _ in vms:
            await touch(vm)
        await asyncio.sleep(0.5)
        anon = (status_kib("RssAnon") - base_anon) / extra
        heap = (_vsock_heap() - base_heap) / extra
    finally:
        tracemalloc.stop()
        for vm, run_dir in vms:
            await vm.close()
            remove_run_dir(run_dir)
    return {"extra_vms": extra, "process_rss_anon_kib_per_vm": round(anon),
            "vsock_heap_kib_per_vm": round(heap / 1024, 1),
            "separate_python_process_rss_kib": python_process_rss_kib()}


def _vsock_heap() -> int:
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(True, "*/host_sandboxer/vsock/*")])
    return sum(stat.size for stat in snapshot.statistics("filename"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--extra-vms", type=int, default=4)
    args = parser.parse_args()
    if args.extra_vms < 1:
        parser.error("--extra-vms must be at least 1: the memory figures are per extra VM")

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="backend-loop", daemon=True)
    thread.start()

    def on_loop(coro, timeout=300):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    vm, run_dir = on_loop(boot(0))
    try:
        bench = Bench(loop, vm)
        size = args.mib * MiB
        report = {"guest": "tests/vm vsock echo guest, TCG, 1 vCPU, 256 MiB",
                  "connect_ms": bench.connect_ms(), "rtt_ms": bench.rtt_ms(),
                  "h2g": bench.host_to_guest(size), "g2h": bench.guest_to_host(size),
                  "mib": args.mib}
        report["memory"] = on_loop(memory_per_vm(vm, args.extra_vms))
        report["targets"] = {
            "backend_cpu_le_quarter_of_qemu": all(report[d]["backend_over_qemu"] <= 0.25 for d in ("h2g", "g2h")),
            "throughput_ge_80pct_of_trial": (report["h2g"]["mib_s"] >= 0.8 * TRIAL["h2g_mib_s"][0]
                                             and report["g2h"]["mib_s"] >= 0.8 * TRIAL["g2h_mib_s"][0]),
            "le_1mb_per_extra_vm": report["memory"]["vsock_heap_kib_per_vm"] <= 1024,
        }
    finally:
        on_loop(vm.close())
        remove_run_dir(run_dir)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
