"""One operation of ops.py inside the pods' mount namespace: a short-lived process, since only a
single-threaded process may enter a mount namespace (the daemon has threads).

Started lean (lean_python.py) with the pinned namespace file as its argument and the detached
mounts the request names as inherited fds; reads one request (JSON: {"op", "args"}) on stdin,
joins the namespace, runs it, writes {"result"} or {"error": [errno, message]} on stdout.
"""
import json
import os
import sys

from host_sandboxer.mountns.ops import OPERATIONS
from vmm_common.mount import CLONE_NEWNS, setns


def main(argv: list[str]) -> int:
    request = json.load(sys.stdin)
    try:
        fd = os.open(argv[0], os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(fd, CLONE_NEWNS)
        finally:
            os.close(fd)
        answer = {"result": OPERATIONS[request["op"]](*request["args"])}
    except OSError as exc:
        answer = {"error": [exc.errno or 0, exc.strerror or str(exc)]}
    json.dump(answer, sys.stdout)
    return 0
