"""containerd's stdio FIFOs, opened only if they are FIFOs.

The stdio paths come with Create/Exec. The daemon is root: a path naming a regular file
(/etc/shadow) or a device would have it write a container's output there or feed its stdin from
it. So a path is first opened O_PATH (which opens nothing: no device driver sees an open), that
descriptor's fstat must say FIFO, and the very inode it holds is then opened through
/proc/self/fd with the relay's flags (always O_NONBLOCK): what was checked is what is opened.
"""

import os
import stat

import grpc

from host_sandboxer.taskproxy.errors import HostError

_KINDS = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


class NotAFifo(HostError):
    """A stdio path that is not a FIFO (INVALID_ARGUMENT for containerd)."""

    def __init__(self, stream: str, path: str, why: str):
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, f"{stream} {path!r}: {why}")


def check_fifo(stream: str, path: str) -> None:
    """NotAFifo unless `path` is a FIFO (Create/Exec refuse such a request before anything)."""
    os.close(_fifo_anchor(stream, path))


def open_fifo(stream: str, path: str, flags: int) -> int:
    """`path` opened with `flags` | O_NONBLOCK | O_CLOEXEC | O_NOCTTY if it is a FIFO; NotAFifo
    otherwise, OSError as open(2) fails (ENXIO: a FIFO opened for writing that nobody reads)."""
    anchor = _fifo_anchor(stream, path)
    try:
        return os.open(f"/proc/self/fd/{anchor}", flags | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    finally:
        os.close(anchor)


def _fifo_anchor(stream: str, path: str) -> int:
    """An O_PATH descriptor of `path`, checked to be a FIFO."""
    try:
        anchor = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise NotAFifo(stream, path, exc.strerror or str(exc)) from None
    mode = os.fstat(anchor).st_mode
    if not stat.S_ISFIFO(mode):
        os.close(anchor)
        what = next((what for test, what in _KINDS if test(mode)), "a file of an unknown kind")
        raise NotAFifo(stream, path, f"{what}, not a FIFO")
    return anchor
