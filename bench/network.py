"""Network benchmark: TCP between a peer namespace and a container of a pod whose network is
taken over by the VM (veth -> tc mirred -> tap -> virtio-net, and back).

    python -m bench.network [--mib 32] [--rounds 200]

Boots one pod with the real vmm-sandboxer in a NetnsPair (192.0.2.0/24, the bench's own
namespaces) and prints one JSON object: TCP round trip of 64-byte messages peer -> container
echo (median/p90/p99/min ms over --rounds), throughput peer -> container and container -> peer
(MiB/s for --mib MiB, timed on the peer: into busybox `nc -l > /dev/null`, and a download
from busybox httpd), the vCPUs and the accelerator of the VM.  --mib at most 48: the download
is served from the container's 64 MiB tmpfs /dev.
"""
from __future__ import annotations

import argparse
import socket
import sys
import time

from bench.netpod import NetPod, print_pod_measurement, round_trip_stats

CHUNK = 65536
ECHO_PORT, SINK_PORT, HTTP_PORT, STOP_PORT = 9001, 9002, 9003, 9004


def round_trips(pod: NetPod, rounds: int) -> dict:
    container = pod.run_in_background("echo", f"nc -l -p {ECHO_PORT} -e cat")
    with pod.connect_from_peer(ECHO_PORT) as conn:
        stats = round_trip_stats(conn, rounds)
    container.result(60)
    return stats


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
    """A download from busybox httpd in the container (sendfile from the container's tmpfs
    /dev: `dd | nc` measured busybox's pipe loop, 1-2 MiB/s, not the network)."""
    total = mib * 1024 * 1024
    container = pod.run_in_background("source", (
        f"mkdir /dev/w && dd if=/dev/zero of=/dev/w/f bs={CHUNK} count={total // CHUNK} 2>/dev/null"
        f" && {{ httpd -f -p {HTTP_PORT} -h /dev/w & nc -l -p {STOP_PORT}; kill $!; }}"))
    with pod.connect_from_peer(HTTP_PORT) as conn:
        conn.settimeout(120)
        conn.sendall(b"GET /f HTTP/1.0\r\n\r\n")
        received, start = 0, time.perf_counter()
        while data := conn.recv(CHUNK * 4):
            received += len(data)
        elapsed = time.perf_counter() - start
    pod.connect_from_peer(STOP_PORT).close()
    container.result(60)
    if received < total:
        raise RuntimeError(f"container -> peer: {received} of {total} bytes arrived")
    return round(mib / elapsed, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    if not 1 <= args.mib <= 48:
        parser.error("--mib must be 1..48")

    def measure(daemon, pod) -> dict:
        info = daemon.info(pod.id)
        return {"path": "peer veth -> pod veth -> tc mirred -> tap -> virtio-net -> container",
                "vcpus": int(info["vcpus"]), "accel": info["accel"],
                "tcp_round_trip_64B": round_trips(pod, args.rounds),
                "tcp_mib_per_s": {"mib": args.mib,
                                  "peer_to_container": peer_to_container(pod, args.mib),
                                  "container_to_peer": container_to_peer(pod, args.mib)}}
    return print_pod_measurement(measure)


if __name__ == "__main__":
    sys.exit(main())
