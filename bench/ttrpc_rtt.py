"""ttrpc unary round trip over a unix socket: the floor under every agent call.

    python -m bench.ttrpc_rtt [--calls 2000] [--payload 0]

The server runs in a child process (its own interpreter and event loop, as the agent
would); the client times sequential calls of grpc.SandboxService/Check-sized messages
(an Echo of `--payload` bytes). Prints one JSON object with p50/p99/mean in microseconds.
"""
import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from google.protobuf import wrappers_pb2

from vmm_common import ttrpc

SERVICE = "bench.Echo"


async def echo(req, ctx):
    return req


async def serve(path: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen()
    server = ttrpc.Server()
    server.register(SERVICE, {"Echo": ttrpc.unary(wrappers_pb2.BytesValue, echo)})
    await server.serve(sock)


async def measure(path: str, calls: int, payload: int) -> list[float]:
    for _ in range(100):
        if os.path.exists(path):
            break
        await asyncio.sleep(0.05)
    client = await ttrpc.Client.connect_unix(path)
    request = wrappers_pb2.BytesValue(value=b"x" * payload)
    samples = []
    try:
        for _ in range(calls // 10):  # warm-up
            await client.call(SERVICE, "Echo", request, wrappers_pb2.BytesValue, timeout=5)
        for _ in range(calls):
            start = time.perf_counter()
            await client.call(SERVICE, "Echo", request, wrappers_pb2.BytesValue, timeout=5)
            samples.append((time.perf_counter() - start) * 1e6)
    finally:
        await client.close()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--payload", type=int, default=0, help="bytes echoed per call")
    parser.add_argument("--serve", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.sock")
        server = subprocess.Popen([sys.executable, "-m", "bench.ttrpc_rtt", "--serve", path])
        try:
            samples = asyncio.run(measure(path, args.calls, args.payload))
        finally:
            server.terminate()
            server.wait()
    quantiles = statistics.quantiles(samples, n=100)
    print(json.dumps({
        "bench": "ttrpc_rtt", "transport": "unix", "calls": len(samples),
        "payload_bytes": args.payload, "p50_us": round(quantiles[49], 1),
        "p99_us": round(quantiles[98], 1), "mean_us": round(statistics.fmean(samples), 1),
    }))


if __name__ == "__main__":
    main()
