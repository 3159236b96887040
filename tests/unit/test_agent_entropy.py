"""The agent's CRNG reseed (vmm_task/pod/entropy.py) against the real kernel: the ioctl numbers
and rand_pool_info layout are accepted (a wrong one is EINVAL/ENOTTY). The "hardware RNG" is a
file here (the host has no /dev/hwrng to spare); the pool is the host's real /dev/urandom, which
the seed only adds to. Needs root (CAP_SYS_ADMIN for both ioctls)."""
import os

import pytest

from vmm_task.pod import entropy

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="RNDADDENTROPY/RNDRESEEDCRNG need CAP_SYS_ADMIN")


def test_reseed_credits_the_seed_and_reseeds(tmp_path):
    source = tmp_path / "hwrng"
    source.write_bytes(os.urandom(entropy.SEED_BYTES))
    entropy.reseed(str(source))


def test_short_source_is_an_error_naming_it(tmp_path):
    source = tmp_path / "hwrng"
    source.write_bytes(b"x" * 5)
    with pytest.raises(OSError, match=f"{source} gave 5 of 32 bytes"):
        entropy.reseed(str(source))

