"""The real vmm-sandboxer on a private work dir, driven by the CRI-like client of
scripts/demo.py, and the checks that a pod left nothing behind: what the soak
(test_soak.py) and the whole-stack stdin test (test_sandboxer_stdin.py) share.
The `harness` fixture (conftest.py) gives one per test and closes it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.netpair import sh
from host_sandboxer.mountns.space import Pinned
from host_sandboxer.vmm.template import TEMPLATES_DIR
from leak_guard import fail_if_left, mounts_left, stop_daemon
from scripts import demo
from vmm_common.protos.containerd.services.sandbox.v1 import sandbox_pb2 as sb

NS = demo.NAMESPACE


def exists_for_the_guest(state: Path, path: Path) -> bool:
    """Whether `path` exists in the pods' mount namespace of the daemon's `state` dir, where
    a pod's `mounts/` and `shared/` are mounted (host_sandboxer/mountns): on the host they are
    empty directories."""
    pin = Pinned(state)
    enter = ["nsenter", f"--mount={pin.namespace_file}", "--"] if pin.made else []
    return subprocess.run([*enter, "test", "-e", str(path)], timeout=30).returncode == 0


def processes_naming(text: str, exclude: tuple[int, ...] = ()) -> list[str]:
    """Command lines of live processes that mention `text` (a leaked VMM or virtiofsd)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in (os.getpid(), *exclude):
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{entry}: {cmdline[:200]}")
    return found


def processes_left(text: str, exclude: tuple[int, ...] = (), grace_s: float = 15.0) -> list[str]:
    """processes_naming() once they had `grace_s` to go: virtiofsd's sandboxed child ends on
    its parent's death signal, a moment after the parent the daemon stopped."""
    deadline = time.monotonic() + grace_s
    while (left := processes_naming(text, exclude)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def host_network() -> dict:
    """The host namespace's taps and ingress qdiscs: a pod's belong in its own namespace, and
    pods without one get none."""
    links = json.loads(sh("ip", "-j", "-d", "link", "show"))
    return {"taps": sorted(link["ifname"] for link in links
                           if link.get("linkinfo", {}).get("info_kind") == "tun"),
            "ingress": sorted(q["dev"] for q in json.loads(sh("tc", "-j", "qdisc")) if q["kind"] == "ingress")}


class Harness:
    def __init__(self):
        self.host_network = host_network()
        self.work = Path(tempfile.mkdtemp(prefix="vsk-"))  # short: unix socket paths
        self.daemon = demo.Daemon(self.work)
        self.daemon.config.write_text(self.daemon.config.read_text().replace(
            "boot_timeout_s = 60.0", "boot_timeout_s = 180.0"))
        self.daemon.start()
        self.cri = demo.Cri(self.daemon.socket)
        self.lower = demo.busybox_tree()

    def spec(self, cid, args, pid, pod_pid_namespace=True):
        spec = demo.cri_spec(args, cid, pid)
        if not pod_pid_namespace:  # the guest's root PID namespace: /proc/1 is the agent
            spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "pid"]
        return spec

    def bundle(self, started, cid, args, pod_pid_namespace=True) -> demo.Bundle:
        return demo.Bundle(self.work / "bundles", cid, self.spec(cid, args, started.pid, pod_pid_namespace),
                           self.lower)

    def run(self, started, cid, args, pod_pid_namespace=True):
        """(stdout, stderr, exit status) of a container run to its end in the started pod."""
        bundle = self.bundle(started, cid, args, pod_pid_namespace)
        result = demo.run_container(demo.Cri.task_client(started.address), bundle)
        shutil.rmtree(bundle.path)
        return result

    def status(self, sid):
        return self.cri.controller.Status(sb.ControllerStatusRequest(sandbox_id=sid), metadata=NS, timeout=10)

    def assert_nothing_left(self):
        assert processes_left(str(self.work), exclude=(self.daemon.proc.pid,)) == []
        assert mounts_left(self.work) == []
        assert [p.name for p in self.daemon.state.iterdir() if p.is_dir() and p.name not in (".mntns", TEMPLATES_DIR)] == []  # no pod's dir
        assert self.daemon.cgroups_left() == []
        assert host_network() == self.host_network

    def close(self):
        """Fails the test naming what it left (pods outlive the daemon: those not removed)."""
        left = stop_daemon(self.daemon, self.work)
        shutil.rmtree(self.work, ignore_errors=True)
        fail_if_left(left)
