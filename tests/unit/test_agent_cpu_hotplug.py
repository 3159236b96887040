"""The agent's vCPU onlining (vmm_task/init/cpu_hotplug.py) against a stand-in sysfs directory:
the kernel's hot-add uevents need a guest (tests/vm/test_sandboxer_resize.py hot-adds a real one)."""
import asyncio

import pytest

from vmm_task.init import cpu_hotplug


@pytest.fixture
def sysfs(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_hotplug, "CPU_DIR", str(tmp_path))
    (tmp_path / "cpu0").mkdir()  # the boot CPU has no `online` file
    for name, state in (("cpu1", "1"), ("cpu2", "0")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "online").write_text(state)
    return tmp_path


def test_online_cpus_are_counted_from_the_kernels_ranges(sysfs):
    for ranges, count in (("0\n", 1), ("0-2\n", 3), ("0-2,4,6-7\n", 6)):
        (sysfs / "online").write_text(ranges)
        assert cpu_hotplug.online_count() == count


def test_start_onlines_a_present_offline_cpu(sysfs):
    async def scenario():
        stop = cpu_hotplug.start(asyncio.get_running_loop())  # a real uevent socket, no event
        stop()

    asyncio.run(scenario())
    assert (sysfs / "cpu2" / "online").read_text() == "1"
    assert not (sysfs / "cpu0" / "online").exists()


def test_a_cpu_that_cannot_be_onlined_is_logged_not_fatal(sysfs, caplog):
    cpu_hotplug.online("cpu9")  # gone again: nothing to write to
    assert "cpu9 hot-added, but it cannot be onlined" in caplog.text
