"""The boot benchmark's floors (initrd/floor.py): what each boots as /init, and the Python floor's
program itself, run here as it runs in the guest."""
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from initrd import agent, floor
from initrd.floor import PYTHON_FLOOR_ENTRY, floor_tree, python_floor_tree


def _console_entries(tree) -> None:
    console = tree.entries["dev/console"]
    assert stat.S_ISCHR(console.mode) and console.rdev == (5, 1)
    assert tree.entries["proc"].kind == "dir"


def test_the_busybox_floor_runs_its_script_as_init():
    tree = floor_tree()
    assert tree.entries["init"].data.startswith(b"#!/usr/bin/busybox sh\n")
    assert floor.READY_LINE.encode() in tree.entries["init"].data
    _console_entries(tree)


def test_the_python_floor_sits_where_the_agent_does_with_its_libraries(tmp_path):
    dist = tmp_path / "dist"
    dist.mkdir()
    shutil.copy("/bin/true", dist / agent.BINARY_NAME)  # a dynamically linked ELF, as Nuitka's
    compiled = agent.Agent(dist, agent.BINARY_NAME, [], True, "test")
    tree = python_floor_tree(compiled)
    assert tree.entries["init"].data == b"sbin/init"
    assert tree.entries["sbin/init"].data == f"../usr/lib/vmm-task/{agent.BINARY_NAME}".encode()
    assert f"usr/lib/vmm-task/{agent.BINARY_NAME}" in tree
    assert any(Path(path).name.startswith("libc.so") for path in tree.entries)
    _console_entries(tree)


def test_the_python_floor_program_prints_the_ready_line_at_once_and_stays():
    process = subprocess.Popen([sys.executable, "-S", str(PYTHON_FLOOR_ENTRY)], stdout=subprocess.PIPE)
    try:
        line = process.stdout.readline().decode()
        assert line.startswith("vmm-task ready (floor: "), line  # what the launcher waits for
        assert line.rstrip().split(" ready=")[1].endswith("s")
        assert process.poll() is None  # PID 1 must not exit
    finally:
        process.kill()
        process.wait()


def test_the_floor_and_the_agent_are_separate_builds():
    assert agent.cache_key(PYTHON_FLOOR_ENTRY) != agent.cache_key()
    assert agent.cache_key(PYTHON_FLOOR_ENTRY) == agent.cache_key(PYTHON_FLOOR_ENTRY)
