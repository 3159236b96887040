"""The pod's `netns_path` from Controller.Create, checked before it is ever used.

Start moves every interface of that namespace into the VM (taps and tc redirects), so a path
naming the daemon's own network namespace or the host's (`/proc/1/ns/net`) would hand the
host's interfaces to a guest. It must be a network namespace (NS_GET_NSTYPE on the opened
file), and neither of those two (compared by device and inode, so no alias path gets through;
PID 1's only where the daemon may look at PID 1: without CAP_SYS_PTRACE, as in some containers,
it may not, and the daemon's own, in practice the host's, is what it compares with).
"""

import errno
import fcntl
import os

import grpc

from host_sandboxer.taskproxy.errors import HostError

NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), linux/nsfs.h
CLONE_NEWNET = 0x40000000
_FORBIDDEN = {"/proc/self/ns/net": "the daemon's own network namespace",
              "/proc/1/ns/net": "the host's network namespace (PID 1's)"}


def check_netns_path(path: str) -> None:
    """HostError INVALID_ARGUMENT naming `path` unless it is a pod's own network namespace
    ("" is the host network: nothing is moved, nothing to check)."""
    if not path:
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        _refuse(path, exc.strerror or str(exc))
    try:
        try:
            kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError as exc:
            if exc.errno != errno.ENOTTY:
                raise
            _refuse(path, "not a namespace file")
        if kind != CLONE_NEWNET:
            _refuse(path, f"a namespace of another type (0x{kind:x}), not a network namespace")
        opened = os.fstat(fd)
    finally:
        os.close(fd)
    for other, what in _FORBIDDEN.items():
        try:
            known = os.stat(other)
        except OSError:
            continue
        if (opened.st_dev, opened.st_ino) == (known.st_dev, known.st_ino):
            _refuse(path, f"it is {what}")


def _refuse(path: str, why: str):
    raise HostError(grpc.StatusCode.INVALID_ARGUMENT, f"netns_path {path!r}: {why}")
