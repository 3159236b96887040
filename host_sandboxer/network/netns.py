"""Run a function on a thread inside the pod's network namespace.

setns(CLONE_NEWNET) moves only the calling thread, so a fresh thread enters the namespace, runs
the function and ends: netlink sockets and tap fds it opens stay bound to that namespace while
the daemon's other threads (and QEMU, which runs in the host namespace) never move.
"""
from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import threading
from typing import Callable, TypeVar

from host_sandboxer.network.errors import NamespaceGone, NetworkError

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def open_netns(path: str) -> int:
    """An fd on the namespace file at `path` (NetworkError if there is none)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceGone(f"network namespace {path} does not exist") from None
    except OSError as e:
        raise NetworkError(f"network namespace {path}: {e.strerror}") from None


def run_in_netns(path: str, fn: Callable[[], T]) -> T:
    """fn() on a new thread inside the namespace at `path`; its result or its exception."""
    fd = open_netns(path)
    outcome: dict = {}

    def body() -> None:
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                gone = NamespaceGone if err == errno.EINVAL else NetworkError  # not an nsfs file
                raise gone(f"cannot enter network namespace {path}: {os.strerror(err)}")
            outcome["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            outcome["error"] = e

    try:
        thread = threading.Thread(target=body, name="pod-netns", daemon=True)
        thread.start()
        thread.join()
    finally:
        os.close(fd)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


async def in_netns(path: str, fn: Callable[[], T]) -> T:
    """run_in_netns without blocking the event loop."""
    return await asyncio.to_thread(run_in_netns, path, fn)
