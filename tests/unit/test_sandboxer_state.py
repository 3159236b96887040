"""The daemon's state directory and ID validation."""

import os
import stat

import pytest

from host_sandboxer.sandbox.ids import InvalidID, check_id
from host_sandboxer.sandbox.statedir import StateDir


@pytest.mark.parametrize("good", ["a", "pod-1", "A_b.c", "x" * 128])
def test_valid_ids(good):
    assert check_id("sandbox", good) == good


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "a/b", "-a", ".hidden", "x" * 129, "a\n", None])
def test_ids_that_could_escape_a_directory_are_rejected(bad):
    with pytest.raises(InvalidID, match="invalid container id"):
        check_id("container", bad)


def test_state_dir_is_root_only_and_state_round_trips(tmp_path):
    sd = StateDir(tmp_path / "state")
    sd.create_sandbox_dir("p1")
    sd.write_state("p1", {"id": "p1", "state": "running"})
    sd.write_state("p1", {"id": "p1", "state": "stopped"})
    assert stat.S_IMODE(os.stat(sd.root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(sd.sandbox_dir("p1")).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(sd.sandbox_dir("p1") / "state.json").st_mode) == 0o600
    assert sd.load_all() == {"p1": {"id": "p1", "state": "stopped"}}
    assert sorted(os.listdir(sd.sandbox_dir("p1"))) == ["state.json"]


def test_load_all_skips_corrupt_and_foreign_entries(tmp_path):
    sd = StateDir(tmp_path)
    sd.create_sandbox_dir("good")
    sd.write_state("good", {"id": "good"})
    sd.create_sandbox_dir("bad")
    (sd.sandbox_dir("bad") / "state.json").write_text("{truncated")
    (tmp_path / ".lost+found").mkdir()
    assert sd.load_all() == {"good": {"id": "good"}}
    assert (sd.sandbox_dir("bad") / "state.json").read_text() == "{truncated", "kept for a human"
