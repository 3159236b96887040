"""The agent's CRNG reseed (vmm_task/pod/entropy.py) against the real kernel: the ioctl numbers
and rand_pool_info layout are accepted (a wrong one is EINVAL/ENOTTY). The "hardware RNG" is a
file here (the host has no /dev/hwrng to spare); the pool is the host's real /dev/urandom, which
the seed only adds to. Needs root (CAP_SYS_ADMIN for both ioctls)."""
import os
import random
import subprocess
import sys

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
    source.write_bytes(os.urandom(entropy.SEED_BYTES))
    entropy.reseed(str(source))


@needs_root
def test_short_source_is_an_error_naming_it(tmp_path):
    source = tmp_path / "hwrng"
    source.write_bytes(b"x" * 5)
    with pytest.raises(OSError, match=f"{source} gave 5 of 32 bytes"):
        entropy.reseed(str(source))

