"""A helper process the daemon runs once per state directory (per node) and that outlives it:
the hybrid vsock backend, the task relay.

Its files sit in the state directory: `<name>.sock` (its control socket, which it creates, or
which the daemon creates and hands it as an fd: a helper running as a user of its own may not
write the state directory), `<name>.json` (its pid and start time: a restarted daemon adopts
the very process, never a reused pid), `<name>.log` (its output, capped: helper_output.py). It
is started lean (lean_python.py) in its own session (process.py), so it does not end with the
daemon.
"""
from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

from host_sandboxer import lean_python
from host_sandboxer.containment import helpers
from host_sandboxer.private_socket import listen_unix
from host_sandboxer.vmm import process
from host_sandboxer.vmm.helper_output import HelperOutput

START_TIMEOUT_S = 10.0


class HelperError(RuntimeError):
    pass


class NodeHelper:
    def __init__(self, state_dir: Path, name: str, module: str, user: int | None = None,
                 listen_backlog: int | None = None):
        """`module`'s main() takes the control socket's path as its one argument, or with
        `listen_backlog` the fd of the control socket the daemon made listening; `user`: the
        uid and gid it runs as (None: root)."""
        self.what = name.replace("-", " ")  # in messages: "the vsock backend"
        self.module = module
        self.user = user
        self.listen_backlog = listen_backlog
        self.control = state_dir / f"{name}.sock"
        self.record_path = state_dir / f"{name}.json"
        self.output = HelperOutput(state_dir / f"{name}.log")
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def adopt(self) -> bool:
        """Take over the process an earlier daemon left, if it still runs; whether we have one."""
        if self.proc is None:
            self.proc = process.adopt(self._read_record(), self.output)
        return self.alive()

    async def ensure_running(self) -> bool:
        """Adopt or spawn it; True if it was spawned now (it knows nothing yet)."""
        if self.alive():
            return False
        self.proc = None
        if self.adopt():
            return False
        self.control.unlink(missing_ok=True)
        if self.listen_backlog is None:
            self.proc = await process.spawn(lean_python.command(self.module, str(self.control)), self.output,
                                            confinement=helpers.confinement(self.user))
        else:
            with listen_unix(str(self.control), self.listen_backlog) as listener:
                self.proc = await process.spawn(lean_python.command(self.module, str(listener.fileno())),
                                                self.output, pass_fds=[listener.fileno()],
                                                confinement=helpers.confinement(self.user))
        self.record_path.write_text(json.dumps(process.identity(self.proc)))
        self.record_path.chmod(0o600)
        return True

    async def connect(self) -> socket.socket:
        """A connection to its control socket (non-blocking), waiting for a fresh process to
        listen; HelperError if it does not within START_TIMEOUT_S or ends."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, str(self.control))
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if not self.alive() or loop.time() > deadline:
                    raise HelperError(f"the {self.what} did not start: {self.output.tail()}") from None
                await asyncio.sleep(0.005)

    async def stop(self) -> None:
        """A clean end: SIGTERM (then SIGKILL), its files removed."""
        if self.proc is not None:
            await process.stop(self.proc)
        self.output.remove()
        for path in (self.record_path, self.control):
            path.unlink(missing_ok=True)

    def describe_end(self) -> str:
        """How it ended, with the last lines it wrote."""
        tail = self.output.tail(3).strip()
        return f"the {self.what} {process.describe_end(self.proc)}" + (f": {tail}" if tail else "")

    def _read_record(self) -> dict | None:
        try:
            return json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            return None
