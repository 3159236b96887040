"""grpc.SandboxService/Check round trip to a booted guest over hybrid vsock (the host's view of
every agent call: unix socket -> vhost-user backend -> virtio-vsock -> the agent under TCG).

    python -m bench.check_rtt [--calls 500]

One connection, sequential calls after a warm-up; prints one JSON object with every sample in
milliseconds and p50/p99 (bench.ttrpc_rtt is the same call over a plain unix socket: the floor).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from google.protobuf import empty_pb2

from bench import boot
from host_sandboxer.vmm.vm import GuestVm
from vmm_common.protos.kuasar import sandbox_pb2

WARM_UP = 20


def percentile(samples: list[float], q: int) -> float:
    """The q-th percentile (1..99) by statistics.quantiles' exclusive method."""
    if len(samples) < 2:
        return samples[0]
    return statistics.quantiles(samples, n=100)[q - 1]


async def run(calls: int) -> dict:
    config = boot.bench_config(argparse.Namespace(sharefs="virtiofs", machine="q35"))
    work = Path(tempfile.mkdtemp(prefix="bench-rtt-"))
    vm = GuestVm(config, work / "vm", name="bench-rtt")
    samples = []
    try:
        await vm.start()
        client = await vm.ttrpc_client()
        try:
            for i in range(WARM_UP + calls):
                started = time.perf_counter()
                await client.call("grpc.SandboxService", "Check", sandbox_pb2.CheckRequest(),
                                  empty_pb2.Empty, timeout=10)
                if i >= WARM_UP:
                    samples.append((time.perf_counter() - started) * 1000)
        finally:
            await client.close()
    finally:
        await vm.close()
        shutil.rmtree(work, ignore_errors=True)
    return {"transport": "hybrid vsock", "accel": vm.accel.accel, "calls": calls,
            "p50_ms": round(percentile(samples, 50), 3), "p99_ms": round(percentile(samples, 99), 3),
            "samples_ms": [round(s, 3) for s in samples]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.calls))))


if __name__ == "__main__":
    main()
