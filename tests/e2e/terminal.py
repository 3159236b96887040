"""crictl with a real terminal: `exec -it` / `attach -it` refuse to run unless stdin is one
("input is not a terminal"), so the test gives crictl a pseudo-terminal of a chosen size and
plays the user at its other end."""
from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import termios
import time

from crictl import QUIET_ENV


def run_in_terminal(argv: list[str], keystrokes: list[bytes], rows: int = 40, cols: int = 100,
                    timeout: float = 120.0) -> tuple[int, bytes]:
    """Run `argv` on a fresh pty sized rows x cols, type each of `keystrokes` (one per second's
    wait for output), and return (exit status, everything the terminal showed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                            env=QUIET_ENV)
    os.close(slave)
    shown, pending = bytearray(), list(keystrokes)
    deadline, quiet_since = time.monotonic() + timeout, time.monotonic()
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer of the pty is gone
                    break
                if not chunk:
                    break
                shown += chunk
                quiet_since = time.monotonic()
            elif pending and time.monotonic() - quiet_since > 1.0:
                os.write(master, pending.pop(0))
                quiet_since = time.monotonic()
            elif proc.poll() is not None and not pending:
                break
        else:
            raise AssertionError(f"{argv[-3:]} still running after {timeout:.0f} s; shown: {bytes(shown)[-500:]!r}")
        return proc.wait(30), bytes(shown)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
