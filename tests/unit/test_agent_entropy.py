"""The agent's CRNG reseed (vmm_task/pod/entropy.py) against the real kernel: the ioctl numbers
and rand_pool_info layout are accepted (a wrong one is EINVAL/ENOTTY). The "hardware RNG" is a
file here (the host has no /dev/hwrng to spare); the pool is the host's real /dev/urandom, which
the seed only adds to. The reseed tests need root (CAP_SYS_ADMIN for both ioctls)."""
import asyncio
import os
import random
import struct
import subprocess
import sys
import threading

import pytest

from vmm_task.pod import entropy

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="RNDADDENTROPY/RNDRESEEDCRNG need CAP_SYS_ADMIN")


def test_python_random_is_reseeded_when_loaded():
    """A clone's agent is the template's process: its `random` state must not be every clone's."""
    random.seed(1234)
    cloned = random.getstate()
    assert entropy.reseed_python()
    assert random.getstate() != cloned


def test_python_random_not_loaded_stays_unloaded():
    probe = "import sys; from vmm_task.pod import entropy; print(entropy.reseed_python(), 'random' in sys.modules)"
    out = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, check=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.stdout.split() == ["False", "False"]


@needs_root
def test_reseed_credits_the_seed_and_reseeds(tmp_path):
    source = tmp_path / "hwrng"
    source.write_bytes(os.urandom(entropy.STALE_BYTES + entropy.SEED_BYTES))
    asyncio.run(entropy.reseed(str(source)))


@needs_root
def test_reseed_starts_no_thread(tmp_path):
    """A clone's first thread costs it ~0.05 s of TCG during its pod's start (docs/templates.md)."""
    source = tmp_path / "hwrng"
    source.write_bytes(os.urandom(entropy.STALE_BYTES + entropy.SEED_BYTES))

    async def threads_after_reseed() -> int:
        await entropy.reseed(str(source))
        return threading.active_count()

    assert asyncio.run(threads_after_reseed()) == threading.active_count()


@needs_root
def test_short_source_is_an_error_naming_it(tmp_path):
    source = tmp_path / "hwrng"
    source.write_bytes(b"x" * 5)
    wanted = entropy.STALE_BYTES + entropy.SEED_BYTES
    with pytest.raises(OSError, match=f"{source} gave 5 of {wanted} bytes"):
        asyncio.run(entropy.reseed(str(source)))


def test_the_seed_skips_what_the_template_left_buffered(tmp_path, monkeypatch):
    """virtio-rng's and the hwrng core's buffers are restored with the template's RAM: the first
    STALE_BYTES a clone reads are every clone's, the seed is what follows."""
    source = tmp_path / "hwrng"
    stale, fresh = b"T" * entropy.STALE_BYTES, os.urandom(entropy.SEED_BYTES)
    source.write_bytes(stale + fresh)
    credited = []
    monkeypatch.setattr(entropy.fcntl, "ioctl", lambda fd, request, arg=0: credited.append((request, arg)))
    asyncio.run(entropy.reseed(str(source), pool=os.devnull))  # ioctls recorded, not run: no root needed
    seed_ioctl, reseed_ioctl = credited
    assert seed_ioctl == (entropy.RNDADDENTROPY, struct.pack("ii", 8 * len(fresh), len(fresh)) + fresh)
    assert reseed_ioctl[0] == entropy.RNDRESEEDCRNG


def test_a_device_with_nothing_buffered_is_polled_without_blocking(tmp_path):
    """EAGAIN while the device fetches more: the event loop runs on and reads again once bytes
    arrive (a FIFO with a writer and no data behaves as an emptied virtio-rng)."""
    fifo = tmp_path / "hwrng"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)  # a writer, so an empty read is EAGAIN, not end of file

    async def read_while_the_host_answers_later() -> bytes:
        asyncio.get_running_loop().call_later(0.05, os.write, writer, b"x" * 40)
        return await entropy.read_fresh(str(fifo), 40)

    try:
        assert asyncio.run(read_while_the_host_answers_later()) == b"x" * 40
        with pytest.raises(OSError, match="gave 0 of 8 bytes in 0.05 s"):
            asyncio.run(entropy.read_fresh(str(fifo), 8, timeout=0.05))
    finally:
        os.close(writer)
