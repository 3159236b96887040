"""Port-forward benchmark: a container's TCP server reached from localhost of the pod's network
namespace (what CRI's PortForward dials: nft redirect -> the daemon's listener -> vsock -> the
agent -> the guest's loopback), against the same server reached from the peer namespace through
the pod IP (veth -> tc mirred -> tap -> virtio-net).

    python -m bench.portforward [--mib 16] [--rounds 200] [--refusals 20]

Boots one pod with the real vmm-sandboxer in a NetnsPair and prints one JSON object: for each
path, the 64-byte round trip (median/p90/p99 ms over --rounds, one connection), the throughput
into the container and out of it (MiB/s for --mib MiB, timed on the client); for port-forward
also how long a client waits for the reset when nothing listens on the port (median/max ms over
--refusals connections). Every server is busybox `nc -l -e sh -c 'echo ready; exec ...'`: its
"ready" line tells the client it reached the server (a port-forward connection is accepted by
the daemon before the guest is asked, and reset if nothing listens there yet).
"""
from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time

from bench.netpod import NetPod, print_pod_measurement, round_trip_stats
from host_sandboxer.network.netns import run_in_netns

CHUNK = 65536
ECHO_PORT, SINK_PORT, SOURCE_PORT, NOBODY_PORT = 9101, 9102, 9103, 9199
READY = b"ready\n"


def localhost_connect(pod: NetPod, port: int) -> socket.socket:
    """A connection to 127.0.0.1:port made inside the pod namespace."""
    sock = run_in_netns(pod.pair.pod_path, lambda: socket.create_connection(("127.0.0.1", port), 10))
    sock.settimeout(120)
    return sock


def peer_connect(pod: NetPod, port: int) -> socket.socket:
    sock = pod.connect_from_peer(port)
    sock.settimeout(120)
    return sock


def served(connect, pod: NetPod, port: int, deadline_s: float = 60) -> socket.socket:
    """A connection on which the server said it is ready; again while it is refused."""
    deadline = time.monotonic() + deadline_s
    while True:
        sock = connect(pod, port)
        try:
            if sock.recv(len(READY), socket.MSG_WAITALL) == READY:
                return sock
        except ConnectionResetError:
            pass
        sock.close()
        if time.monotonic() > deadline:
            raise TimeoutError(f"no server on port {port} within {deadline_s} s")
        time.sleep(0.2)


def round_trips(pod: NetPod, connect, rounds: int) -> dict:
    container = pod.run_in_background(f"echo-{connect.__name__}", f"nc -l -p {ECHO_PORT} -e sh -c 'echo ready; exec cat'")
    with served(connect, pod, ECHO_PORT) as conn:
        stats = round_trip_stats(conn, rounds)
    container.result(60)
    return stats


def into_container(pod: NetPod, connect, mib: int) -> float:
    container = pod.run_in_background(f"sink-{connect.__name__}", f"nc -l -p {SINK_PORT} -e sh -c 'echo ready; exec cat >/dev/null'")
    with served(connect, pod, SINK_PORT) as conn:
        block = bytes(CHUNK)
        start = time.perf_counter()
        for _ in range(mib * 1024 * 1024 // CHUNK):
            conn.sendall(block)
        conn.shutdown(socket.SHUT_WR)  # cat ends at EOF; the server closes
        while conn.recv(CHUNK):
            pass
        elapsed = time.perf_counter() - start
    container.result(60)
    return round(mib / elapsed, 2)


def out_of_container(pod: NetPod, connect, mib: int) -> float:
    """From a file in the container's tmpfs /dev (cat may sendfile it)."""
    total = mib * 1024 * 1024
    container = pod.run_in_background(f"source-{connect.__name__}", (
        f"mkdir -p /dev/w && dd if=/dev/zero of=/dev/w/f bs={CHUNK} count={total // CHUNK} 2>/dev/null"
        f" && nc -l -p {SOURCE_PORT} -e sh -c 'echo ready; exec cat /dev/w/f'"))
    with served(connect, pod, SOURCE_PORT) as conn:
        received, start = 0, time.perf_counter()
        while data := conn.recv(CHUNK * 4):
            received += len(data)
        elapsed = time.perf_counter() - start
    container.result(60)
    if received < total:
        raise RuntimeError(f"{received} of {total} bytes arrived")
    return round(mib / elapsed, 2)


def refusals(pod: NetPod, count: int) -> dict:
    """How long a port-forward client waits for the reset of a port nobody listens on."""
    times = []
    for _ in range(count):
        with localhost_connect(pod, NOBODY_PORT) as sock:
            start = time.perf_counter()
            try:
                data = sock.recv(1)
            except ConnectionResetError:
                data = None
            times.append((time.perf_counter() - start) * 1000)
            if data is not None:
                raise RuntimeError(f"port {NOBODY_PORT}: {data!r} instead of a reset")
    return {"median_ms": round(statistics.median(times), 3), "max_ms": round(max(times), 3)}


def compare(pod: NetPod, connect, args) -> dict:
    return {"tcp_round_trip_64B": round_trips(pod, connect, args.rounds),
            "into_container_mib_per_s": into_container(pod, connect, args.mib),
            "out_of_container_mib_per_s": out_of_container(pod, connect, args.mib)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--refusals", type=int, default=20)
    args = parser.parse_args()
    if not 1 <= args.mib <= 48:
        parser.error("--mib must be 1..48 (the container's tmpfs /dev holds 64 MiB)")

    def measure(daemon, pod) -> dict:
        info = daemon.info(pod.id)
        result = {"vcpus": int(info["vcpus"]), "accel": info["accel"], "mib": args.mib,
                  "port_forward": compare(pod, localhost_connect, args),
                  "pod_ip_from_peer": compare(pod, peer_connect, args)}
        result["port_forward"]["refused_port_reset"] = refusals(pod, args.refusals)
        return result
    return print_pod_measurement(measure)


if __name__ == "__main__":
    sys.exit(main())
