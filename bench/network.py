"""Network benchmark: TCP between a peer namespace and a container of a pod whose network is
taken over by the VM (veth -> tc mirred -> tap -> virtio-net, and back).

    python -m bench.network [--mib 32] [--rounds 200]

Boots one pod with the real vmm-sandboxer in a NetnsPair (192.0.2.0/24, the bench's own
namespaces) and prints one JSON object: TCP round trip of 64-byte messages peer -> container
echo (median/p90/p99/min ms over --rounds), throughput peer -> container and container -> peer
(MiB/s for --mib MiB, timed on the peer from the first byte to the end), the vCPUs and the
accelerator of the VM.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time

from bench.netpair import PEER_IP, NetnsPair
from bench.netpod import Daemon, NetPod
from host_sandboxer.config import DEFAULT_IMAGE_DIR

CHUNK = 65536
ECHO_PORT, SINK_PORT, SOURCE_PORT = 9001, 9002, 9003


def round_trips(pod: NetPod, rounds: int) -> dict:
    container = pod.run_in_background("echo", f"nc -l -p {ECHO_PORT} -e cat")
    times = []
    with pod.connect_from_peer(ECHO_PORT) as conn:
        message = b"x" * 64
        for _ in range(rounds):
            start = time.perf_counter()
            conn.sendall(message)
            got = b""
            while len(got) < len(message):
                got += conn.recv(len(message) - len(got))
            times.append((time.perf_counter() - start) * 1000)
    container.result(60)
    times.sort()
    return {"rounds": rounds, "median_ms": round(statistics.median(times), 3),
            "p90_ms": round(times[int(len(times) * 0.9)], 3),
            "p99_ms": round(times[int(len(times) * 0.99)], 3), "min_ms": round(times[0], 3)}


def peer_to_container(pod: NetPod, mib: int) -> float:
    container = pod.run_in_background("sink", f"nc -l -p {SINK_PORT} > /dev/null")
    with pod.connect_from_peer(SINK_PORT) as conn:
        conn.settimeout(120)
        block = bytes(CHUNK)
        start = time.perf_counter()
        for _ in range(mib * 1024 * 1024 // CHUNK):
            conn.sendall(block)
        conn.shutdown(socket.SHUT_WR)  # the container's nc ends at EOF and closes
        while conn.recv(CHUNK):
            pass
        elapsed = time.perf_counter() - start
    container.result(60)
    return round(mib / elapsed, 2)


def container_to_peer(pod: NetPod, mib: int) -> float:
    total = mib * 1024 * 1024
    with pod.peer_socket() as server:
        server.bind((PEER_IP, SOURCE_PORT))
        server.listen(1)
        server.settimeout(60)
        container = pod.run_in_background(
            "source", f"dd if=/dev/zero bs={CHUNK} count={total // CHUNK} 2>/dev/null | nc {PEER_IP} {SOURCE_PORT}")
        conn, _ = server.accept()
        with conn:
            conn.settimeout(120)
            received, start = 0, None
            while received < total:
                data = conn.recv(CHUNK * 4)
                if not data:
                    break
                start = start or time.perf_counter()
                received += len(data)
            elapsed = time.perf_counter() - start
    container.result(60)
    if received != total:
        raise RuntimeError(f"container -> peer: {received} of {total} bytes arrived")
    return round(mib / elapsed, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    daemon = Daemon(DEFAULT_IMAGE_DIR / "kernel", DEFAULT_IMAGE_DIR / "initrd.img")
    try:
        with NetnsPair() as pair:
            pod = NetPod(daemon, pair)
            try:
                info = daemon.info(pod.id)
                result = {
                    "path": "peer veth -> pod veth -> tc mirred -> tap -> virtio-net -> container",
                    "vcpus": int(info["vcpus"]), "accel": info["accel"],
                    "tcp_round_trip_64B": round_trips(pod, args.rounds),
                    "tcp_mib_per_s": {"mib": args.mib,
                                      "peer_to_container": peer_to_container(pod, args.mib),
                                      "container_to_peer": container_to_peer(pod, args.mib)},
                }
            finally:
                pod.remove()
    finally:
        daemon.close()
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
