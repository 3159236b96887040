"""Kuasar's debug console (vmm/task/src/debug.rs, started in main.rs with `task.debug`): a shell
on a new pty for each connection to vsock port 1025, from the host only (peers.py).

A first line `KSR_MODE exec`, sent within 100 ms, turns the pty's echo off and the prompt empty,
for a tool that sends commands and reads their output (Kuasar's kuasar-ctl); anything else
read meanwhile goes to the shell. The shell is `task.debug_shell` (Kuasar's default /bin/bash),
else the first of /bin/bash and /bin/sh the image has (`make guest-image DEBUG=1` adds busybox's
sh); a guest without one tells the connection so and closes it.
"""

import asyncio
import contextlib
import logging
import os
import signal
import socket
import termios
from typing import Callable, Optional

from vmm_common.fdio import read_chunk, write_all
from vmm_task import peers

log = logging.getLogger(__name__)

ADDRESS = "vsock://1025"
SHELLS = ("/bin/bash", "/bin/sh")
EXEC_MODE_HEADER = b"KSR_MODE exec"
HEADER_WAIT_S = 0.1
HEADER_LIMIT = 1024


def start(listener: socket.socket, reaper, shell: str = "") -> Callable[[], None]:
    """Serve on `listener` (vsock://1025 in the guest, a unix socket in dev mode; its owner
    closes it); returns what stops serving."""
    return asyncio.ensure_future(serve(listener, reaper, shell)).cancel


def find_shell(configured: str = "") -> Optional[str]:
    for shell in [configured] if configured else SHELLS:
        if os.access(shell, os.X_OK):
            return shell
    return None


async def serve(listener: socket.socket, reaper, shell: str = "") -> None:
    """Accept connections on `listener` for ever, a session each."""
    await peers.serve_each(listener, "debug console",
                           lambda conn: _session(conn, reaper, shell))


async def _session(conn: socket.socket, reaper, configured: str) -> None:
    try:
        with conn:
            await _run_shell(conn, reaper, configured)
    except OSError as e:
        log.info("debug console: session ended: %s", e)


async def _run_shell(conn: socket.socket, reaper, configured: str) -> None:
    loop = asyncio.get_running_loop()
    exec_mode, pending = await _read_header(conn)
    shell = find_shell(configured)
    if shell is None:
        wanted = configured or " or ".join(SHELLS)
        await loop.sock_sendall(conn, f"vmm-task debug console: no shell in this guest "
                                      f"({wanted} missing; build the image with DEBUG=1 or "
                                      "set task.debug_shell)\r\n".encode())
        return
    master, slave = os.openpty()
    try:
        if exec_mode:
            attributes = termios.tcgetattr(slave)
            attributes[3] &= ~termios.ECHO
            termios.tcsetattr(slave, termios.TCSANOW, attributes)
        env = dict(os.environ, PS1="") if exec_mode else None
        try:
            child = await reaper.spawn([shell], stdin=slave, stdout=slave, stderr=slave,
                                       env=env, setsid=True)
        finally:
            os.close(slave)
        log.info("debug console: %s started (pid %d%s)", shell, child.pid,
                 ", exec mode" if exec_mode else "")
        os.set_blocking(master, False)
        await write_all(master, pending)
        await _copy_until_either_ends(conn, master)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)
        await child.wait()
    finally:
        os.close(master)


async def _read_header(conn: socket.socket) -> tuple[bool, bytes]:
    """(exec mode?, bytes read that are the shell's): up to the first newline, 100 ms or 1 KiB."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HEADER_WAIT_S
    buffer = b""
    while len(buffer) < HEADER_LIMIT:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            data = await asyncio.wait_for(loop.sock_recv(conn, 128), remaining)
        except asyncio.TimeoutError:
            break
        if not data:
            break
        buffer += data
        line, newline, rest = buffer.partition(b"\n")
        if newline:
            if line.rstrip(b"\r") == EXEC_MODE_HEADER:
                return True, rest
            break
    return False, buffer


async def _copy_until_either_ends(conn: socket.socket, master: int) -> None:
    loop = asyncio.get_running_loop()

    async def to_shell():
        while data := await loop.sock_recv(conn, 65536):
            await write_all(master, data)

    async def from_shell():
        while data := await read_chunk(master, 65536):
            await loop.sock_sendall(conn, data)

    tasks = [asyncio.ensure_future(to_shell()), asyncio.ensure_future(from_shell())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
