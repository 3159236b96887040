"""A pod of the real vmm-sandboxer in the "pod" namespace of a NetnsPair, with busybox
containers run in it, and sockets of the peer namespace: what the whole-VM network test and
bench/network.py drive.  Uses the make-demo driver (scripts/demo.py) for the daemon and the
CRI-like calls."""
from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from bench.netpair import POD_IP, NetnsPair
from host_sandboxer.config import DEFAULT_IMAGE_DIR
from host_sandboxer.network.netns import run_in_netns
from host_sandboxer.taskproxy.mounts import unmount_all_under
from vmm_common.protos.containerd.services.sandbox.v1 import sandbox_pb2 as sb

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("demo", REPO / "scripts" / "demo.py")
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)


class Daemon:
    """vmm-sandboxer on a private state dir; pods are created with a netns_path."""

    def __init__(self, kernel: Path, initrd: Path, vm_options: str = ""):
        """`vm_options`: TOML lines added to the daemon's [vm] table."""
        self.work = Path(tempfile.mkdtemp(prefix="vnet-"))  # short: unix socket paths
        self.daemon = demo.Daemon(self.work, kernel, initrd)
        self.daemon.config.write_text(self.daemon.config.read_text().replace("[vm]\n", "[vm]\n" + vm_options, 1))
        self.daemon.start()
        self.cri = demo.Cri(self.daemon.socket)
        self.lower = demo.busybox_tree()

    def create(self, sandbox_id: str, netns_path: str) -> None:
        self.cri.controller.Create(sb.ControllerCreateRequest(
            sandbox_id=sandbox_id, options=demo.pod_options(sandbox_id), netns_path=netns_path),
            metadata=demo.NAMESPACE, timeout=10)

    def start(self, sandbox_id: str) -> sb.ControllerStartResponse:
        return self.cri.controller.Start(sb.ControllerStartRequest(sandbox_id=sandbox_id),
                                         metadata=demo.NAMESPACE, timeout=120)

    def info(self, sandbox_id: str) -> dict[str, str]:
        """Controller.Status(verbose) info: boot figures, vcpus, accel, ..."""
        return dict(self.cri.controller.Status(
            sb.ControllerStatusRequest(sandbox_id=sandbox_id, verbose=True),
            metadata=demo.NAMESPACE, timeout=10).info)

    def close(self) -> None:
        self.daemon.stop()
        self.daemon.remove_cgroups()  # and whatever still runs there (pods outlive the daemon)
        unmount_all_under(self.work)
        shutil.rmtree(self.work, ignore_errors=True)


class NetPod:
    """A started pod in `pair.pod`; `run` executes a busybox shell script in a container."""

    def __init__(self, daemon: Daemon, pair: NetnsPair, sandbox_id: str = "netpod"):
        self.daemon, self.pair, self.id = daemon, pair, sandbox_id
        daemon.create(sandbox_id, pair.pod_path)
        started = daemon.start(sandbox_id)
        self.pid = started.pid
        self.tasks = demo.Cri.task_client(started.address)
        self._pool = concurrent.futures.ThreadPoolExecutor(2)

    def run(self, cid: str, script: str) -> tuple[str, str, int]:
        """(stdout, stderr, exit status) of `sh -c script` in a new container of the pod."""
        spec = demo.cri_spec(["sh", "-c", script], cid, self.pid)
        bundle = demo.Bundle(self.daemon.work / "bundles", cid, spec, self.daemon.lower)
        out, err, status = demo.run_container(self.tasks, bundle)
        return out.decode(), err.decode(), status

    def run_in_background(self, cid: str, script: str) -> concurrent.futures.Future:
        return self._pool.submit(self.run, cid, script)

    def peer_socket(self, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket of the peer namespace (a socket keeps the namespace it was made in)."""
        return run_in_netns(f"/var/run/netns/{self.pair.peer}",
                            lambda: socket.socket(socket.AF_INET, kind))

    def connect_from_peer(self, port: int, deadline_s: float = 60) -> socket.socket:
        """A TCP connection from the peer to the pod IP, retried until a server in the VM
        listens (bounded)."""
        deadline = time.monotonic() + deadline_s
        while True:
            s = self.peer_socket()
            s.settimeout(10)
            try:
                s.connect((POD_IP, port))
                return s
            except (ConnectionRefusedError, socket.timeout):
                s.close()
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.3)

    def remove(self) -> None:
        self._pool.shutdown(wait=True)
        self.daemon.cri.remove_pod(self.id)


def print_pod_measurement(measure: Callable[[Daemon, NetPod], dict]) -> int:
    """Boot one pod of the real daemon with the default image in a NetnsPair, print
    `measure(daemon, pod)` as JSON, tear everything down."""
    daemon = Daemon(DEFAULT_IMAGE_DIR / "kernel", DEFAULT_IMAGE_DIR / "initrd.img")
    try:
        with NetnsPair() as pair:
            pod = NetPod(daemon, pair)
            try:
                result = measure(daemon, pod)
            finally:
                pod.remove()
    finally:
        daemon.close()
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


def round_trip_stats(conn: socket.socket, rounds: int) -> dict:
    """64-byte messages echoed back on `conn`, one at a time: median/p90/p99/min ms."""
    times = []
    message = b"x" * 64
    for _ in range(rounds):
        start = time.perf_counter()
        conn.sendall(message)
        got = b""
        while len(got) < len(message):
            got += conn.recv(len(message) - len(got))
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {"rounds": rounds, "median_ms": round(statistics.median(times), 3),
            "p90_ms": round(times[int(len(times) * 0.9)], 3),
            "p99_ms": round(times[int(len(times) * 0.99)], 3), "min_ms": round(times[0], 3)}
