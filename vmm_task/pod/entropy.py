"""Reseed the kernel's CRNG from the host before a pod runs.

A guest restored from a VM template (docs/templates.md) continues the template's CRNG state:
every clone draws the same random numbers until the kernel's next time-based reseed (measured:
two clones printed the same /proc/sys/kernel/random/uuid). SetupSandbox is the first thing the
host asks of every pod's guest, so there the agent credits fresh bytes from the virtio-rng device
(fed from the host's /dev/urandom) to the input pool (RNDADDENTROPY) and makes the CRNG reseed
from it at once (RNDRESEEDCRNG). On a cold boot it costs two ioctls and changes nothing else.
"""

import fcntl
import os
import struct
import sys

HWRNG = "/dev/hwrng"  # virtio-rng (every VM the daemon starts has one: vmm/cmdline.py)
POOL = "/dev/urandom"
SEED_BYTES = 32
RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2]): struct rand_pool_info + its buffer
RNDRESEEDCRNG = 0x5207      # _IO('R', 0x07): needs CAP_SYS_ADMIN


def reseed(source: str = HWRNG, pool: str = POOL) -> None:
    """Mix SEED_BYTES from `source` into the kernel's pool, credited, and reseed the CRNG.
    Raises OSError naming what failed (then nothing was credited, or the reseed did not run)."""
    seed = _read_exactly(source, SEED_BYTES)
    fd = os.open(pool, os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", 8 * len(seed), len(seed)) + seed)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def reseed_python() -> bool:
    """Reseed the agent's own `random` module, if loaded, from the kernel's (reseeded) CRNG: a
    clone's agent is the template's process, with its Mersenne Twister state (pyroute2 imports
    `random`, and task.preload imports pyroute2 in the template: vmm_task.init.preload). Whether
    there was one to reseed."""
    module = sys.modules.get("random")
    if module is None:
        return False
    module.seed()  # from os.urandom
    return True


def _read_exactly(path: str, size: int) -> bytes:
    """A hardware RNG may return less than asked per read; an empty read means it has no more."""
    data = b""
    with open(path, "rb", buffering=0) as f:
        while len(data) < size:
            chunk = f.read(size - len(data))
            if not chunk:
                raise OSError(f"{path} gave {len(data)} of {size} bytes")
            data += chunk
    return data
