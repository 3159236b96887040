"""The network namespace the whole e2e node lives in: containerd, the registry, the sandboxer,
crictl and the test's own HTTP clients all enter it with `nsenter --net=/var/run/netns/NAME`
(not `ip netns exec`, whose private mount namespace would hide the netns files containerd's CNI
code bind-mounts). Its name carries the run's token, so the leak guard sees it if it stays.
"""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

from leak_guard import RUN_VARIABLE

FETCH = """
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as response:
    sys.stdout.buffer.write(response.read())
"""


class NodeNetns:
    def __init__(self) -> None:
        self.name = f"e2e-{os.environ.get(RUN_VARIABLE, 'manual')}-{uuid.uuid4().hex[:8]}"
        self.path = f"/var/run/netns/{self.name}"

    def __enter__(self) -> "NodeNetns":
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True, capture_output=True)
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def argv(self, *argv: str) -> list[str]:
        """`argv` run inside the namespace (nsenter execs it: the pid is the program's)."""
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def fetch(self, url: str, timeout: float = 10.0) -> bytes:
        """The body of an HTTP GET from inside the namespace (Python: busybox wget segfaults
        here); raises CalledProcessError with the client's error on failure."""
        return subprocess.run(self.argv(sys.executable, "-c", FETCH, url, str(timeout)),
                              check=True, capture_output=True, timeout=timeout + 10).stdout
