"""Two network namespaces of their own joined by a veth, addresses from 192.0.2.0/24 only
(TEST-NET-1): the "pod" side as a CNI would leave it (eth0, 192.0.2.1/24, a default route) and
a "peer" (eth0, 192.0.2.2/24).  Used by the network tests and bench/network.py; only these
namespaces carry their traffic.  Uses the `ip`/`tc` tools, an observer independent of pyroute2.
"""
from __future__ import annotations

import json
import os
import subprocess
import uuid

POD_IP, PEER_IP, GATEWAY = "192.0.2.1", "192.0.2.2", "192.0.2.254"


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30).stdout


class NetnsPair:
    def __init__(self) -> None:
        # In a test run, the run's token first: its leak guard (tests/leak_guard.py) knows
        # its own namespaces from those of a run beside it.
        tag = "-".join(filter(None, (os.environ.get("VMM_TASK_TEST_RUN"), uuid.uuid4().hex[:8])))
        self.pod, self.peer = f"vmmt-{tag}-pod", f"vmmt-{tag}-peer"
        self.pod_path = f"/var/run/netns/{self.pod}"

    def __enter__(self) -> "NetnsPair":
        try:
            for ns in (self.pod, self.peer):
                sh("ip", "netns", "add", ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "link", "add", "eth0", "netns", self.pod, "type", "veth",
               "peer", "name", "eth0", "netns", self.peer)
            for ns, ip in ((self.pod, POD_IP), (self.peer, PEER_IP)):
                sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
                sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", self.pod, "route", "add", "default", "via", GATEWAY)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for ns in (self.pod, self.peer):
            sh("ip", "netns", "del", ns, check=False)

    def links(self, ns: str) -> list[dict]:
        return json.loads(sh("ip", "-n", ns, "-j", "-d", "link", "show"))

    def mac(self, ns: str, name: str = "eth0") -> str:
        return next(link["address"] for link in self.links(ns) if link["ifname"] == name)

    def snapshot(self, ns: str) -> dict:
        """What teardown must leave as it was: each link's name, kind, MAC, MTU and flags, every
        qdisc that is not the kernel's default one, and the nftables tables."""
        links = sorted((link["ifname"], link.get("linkinfo", {}).get("info_kind", ""),
                        link["address"], link["mtu"], tuple(link["flags"]))
                       for link in self.links(ns))
        qdiscs = sorted((q["dev"], q["kind"]) for q in json.loads(sh("tc", "-n", ns, "-j", "qdisc"))
                        if q["kind"] not in ("noqueue", "noop"))
        tables = sh("ip", "netns", "exec", ns, "nft", "list", "tables").splitlines()
        return {"links": links, "qdiscs": qdiscs, "nft_tables": sorted(tables)}

    def exec(self, ns: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(("ip", "netns", "exec", ns) + argv, capture_output=True, text=True,
                              timeout=timeout)
