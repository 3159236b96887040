"""A process that holds one of containerd's stdio FIFOs open while no daemon does.

containerd reads a container's output FIFO until EOF, and a FIFO's EOF is "no writer left": the
daemon's death would end the stream for containerd before a restarted daemon could resume it
(and containerd's stdin writes would fail with EPIPE). So each relay hands a copy of its FIFO fd
to a keeper, `sleep infinity` that only holds it, in a session of its own: it outlives the daemon.
Its argv[0] names the stream's mark file, inside the pod's directory, so `kill_strays` of that
directory finds it. It runs confined as the daemon's helpers are (containment/helpers.py). A restarted daemon adopts it (its identity is in the mark); it is stopped
once the stream is finished (containerd then sees EOF) or the process is deleted.
"""

import asyncio
from pathlib import Path

from host_sandboxer.containment import helpers
from host_sandboxer.containment.launch import wrap
from host_sandboxer.vmm import process

_ARGV = ["bash", "-c", 'exec -a "$0" sleep infinity']
STOP_GRACE_S = 1.0


async def spawn(fd: int, mark_path: Path) -> asyncio.subprocess.Process:
    """A keeper holding `fd` (at the same number). It prints nothing: no output is kept."""
    return await asyncio.create_subprocess_exec(
        *wrap([*_ARGV, f"vmm-stdio-keeper {mark_path}"], helpers.confinement()), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True, pass_fds=(fd,))


async def stop(keeper) -> None:
    await process.stop(keeper, STOP_GRACE_S)
