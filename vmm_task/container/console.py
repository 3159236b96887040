"""The runtime's console socket (`--console-socket`): crun/runc connect to it and pass the pty
master of a terminal process with SCM_RIGHTS; the agent keeps the master to copy and resize."""

import asyncio
import fcntl
import os
import socket
import struct
import termios

from vmm_common.fdio import wait_readable

from .fdcopy import set_nonblocking


class ConsoleSocket:
    def __init__(self, path: str):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind(path)
            os.chmod(path, 0o600)
            self._sock.listen(1)
            self._sock.setblocking(False)
        except OSError:
            self.close()
            raise

    async def receive_master(self) -> int:
        """Wait for the runtime to connect and hand over the pty master (non-blocking fd)."""
        conn, _ = await asyncio.get_running_loop().sock_accept(self._sock)
        with conn:
            await wait_readable(conn.fileno())
            _, fds, _, _ = socket.recv_fds(conn, 1024, 4)
        if not fds:
            raise OSError(f"the runtime sent no terminal on {self.path}")
        for extra in fds[1:]:
            os.close(extra)
        return set_nonblocking(fds[0])

    def close(self) -> None:
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def resize(master: int, width: int, height: int) -> None:
    """TIOCSWINSZ on the pty master: the process sees SIGWINCH and the new size."""
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

