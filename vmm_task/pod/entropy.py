"""Reseed the kernel's CRNG from the host before a pod runs.

A guest restored from a VM template (docs/templates.md) continues the template's CRNG state:
every clone draws the same random numbers until the kernel's next time-based reseed (measured:
two clones printed the same /proc/sys/kernel/random/uuid). SetupSandbox is the first thing the
host asks of every pod's guest, so there the agent credits fresh bytes from the virtio-rng device
(fed from the host's /dev/urandom) to the input pool (RNDADDENTROPY) and makes the CRNG reseed
from it at once (RNDRESEEDCRNG). On a cold boot it costs two ioctls and changes nothing else.

The first bytes /dev/hwrng gives a clone are the template's: virtio-rng keeps one buffer of
entropy fetched ahead (drivers/char/hw_random/virtio-rng.c `data`, 64 bytes here) and the hwrng
core keeps what a reader left of its last read (core.c `rng_buffer`, 64 bytes): both are in the
RAM every clone restores. So the seed is what comes after STALE_BYTES: fetched by the clone.

The device is read without blocking and without a thread (a clone's first thread costs it
~0.05 s of TCG under its pod's start): a read with nothing buffered asks the device for more
and fails with EAGAIN; the event loop polls again until the host's bytes arrive.
"""

import asyncio
import fcntl
import os
import struct
import sys
import time

HWRNG = "/dev/hwrng"  # virtio-rng (every VM the daemon starts has one: vmm/cmdline.py)
POOL = "/dev/urandom"
SEED_BYTES = 32
STALE_BYTES = 2 * 64    # virtio-rng's buffer and the hwrng core's (SMP_CACHE_BYTES each on x86)
POLL_S = 0.001          # between reads that found nothing buffered yet
TIMEOUT_S = 5.0         # virtio-rng answers in microseconds from the host's /dev/urandom
RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2]): struct rand_pool_info + its buffer
RNDRESEEDCRNG = 0x5207      # _IO('R', 0x07): needs CAP_SYS_ADMIN


async def reseed(source: str = HWRNG, pool: str = POOL) -> None:
    """Mix SEED_BYTES from `source` (after its STALE_BYTES) into the kernel's pool, credited,
    and reseed the CRNG. Raises OSError naming what failed (then nothing was credited, or the
    reseed did not run)."""
    seed = (await read_fresh(source, STALE_BYTES + SEED_BYTES))[STALE_BYTES:]
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


async def read_fresh(path: str, size: int, timeout: float = TIMEOUT_S) -> bytes:
    """`size` bytes of `path`, read without blocking: a hardware RNG gives what it has buffered
    per read (EAGAIN while the device fetches more); an empty read means it has no more."""
    data = b""
    deadline = time.monotonic() + timeout
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        while len(data) < size:
            try:
                chunk = os.read(fd, size - len(data))
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OSError(f"{path} gave {len(data)} of {size} bytes in {timeout:g} s") from None
                await asyncio.sleep(POLL_S)
                continue
            if not chunk:
                raise OSError(f"{path} gave {len(data)} of {size} bytes")
            data += chunk
    finally:
        os.close(fd)
    return data
