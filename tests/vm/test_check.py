"""`vmm-sandboxer check` end to end (real image, QEMU TCG, hybrid vsock), and the launcher's
failure paths: a missing kernel, a guest that panics, QEMU killed under a running VM, an agent
that never becomes ready."""
import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from host_sandboxer.vmm.accel import HostFacts, choose_accel
from host_sandboxer.vmm.vm import GuestVm, VmError

CLI = [sys.executable, "-m", "host_sandboxer.cli", "check"]


def write_config(tmp_path: Path, guest_image, sharefs: str = "virtiofs", **vm) -> Path:
    settings = {"kernel": str(guest_image.kernel), "initrd": str(guest_image.initrd), **vm}
    lines = (["[vm]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
             + ["[vsock]", 'transport = "hybrid"', "[sharefs]", f"type = {json.dumps(sharefs)}"])
    path = tmp_path / "vmm.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_check(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + ["--config", str(config)], capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("machine, sharefs", [("q35", "virtiofs"), ("microvm", "9p")])
def test_check_boots_calls_and_reports(tmp_path, guest_image, machine, sharefs):
    done = run_check(write_config(tmp_path, guest_image, sharefs=sharefs, machine=machine))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["ok"] is True
    assert (report["transport"], report["accel"], report["machine"], report["sharefs"]) == \
        ("hybrid", choose_accel(HostFacts.probe()).accel, machine, sharefs)  # tcg on the build machine
    boot = report["boot"]
    assert 0 < boot["kernel_init_s"] < report["agent_ready_s"] == boot["agent_ready_s"]
    assert 0 < boot["kernel_init_guest_s"] <= boot["agent_reported"]["started"] <= boot["agent_ready_guest_s"]
    assert boot["agent_reported"]["pid"] == 1 and boot["qemu_cpu_s"] > 0
    assert 0 < report["check_rtt_ms"] < 10_000 and 0 < report["check_rtt_ms_median"] < 10_000
    assert report["shutdown_s"] >= 0
    print(lines[0])  # the figures, visible with -s


def test_check_names_a_missing_kernel(tmp_path, guest_image):
    done = run_check(write_config(tmp_path, guest_image, kernel=str(tmp_path / "no-such-kernel")))
    assert done.returncode == 1
    assert json.loads(done.stdout)["failed"] == "image"
    assert f"no kernel at {tmp_path / 'no-such-kernel'}" in done.stderr


def test_check_names_a_bad_config_key(tmp_path):
    config = tmp_path / "vmm.toml"
    config.write_text('[vm]\nmachine = "pc"\n')
    done = run_check(config)
    assert done.returncode == 2
    assert "vm.machine = 'pc': must be one of 'q35', 'microvm'" in done.stderr


def test_guest_panic_is_reported_and_everything_torn_down(vm_config, vm_loop, tmp_path):
    # No init to run (rdinit= for an initrd, init= for the pmem root): the kernel panics,
    # panic=-1 + -no-reboot end QEMU.
    guest = GuestVm(vm_config, tmp_path / "run", share_dir=tmp_path,
                    kernel_params=["rdinit=/no-such-init", "init=/no-such-init"])
    with pytest.raises(VmError) as err:
        vm_loop.run(guest.start())
    assert err.value.stage == "qemu"
    message = str(err.value)
    assert "QEMU died before the agent was ready: QEMU exited with status 0" in message
    assert "after SHUTDOWN (reason=guest-reset, guest=True)" in message
    assert "console tail:" in message and "Kernel panic" in message
    assert guest.virtiofsd.proc.returncode is not None  # stopped with the VM
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["console.log", "qemu.log", "virtiofsd.log"]


def test_qmp_control_and_qemu_killed_under_a_running_vm(vm):
    qemu = vm.guest.qemu
    assert vm.run(qemu.status()) == "running"

    async def powerdown_reported():
        await qemu.powerdown()  # the agent ignores the ACPI button today; QEMU reports it
        while "POWERDOWN" not in [event["event"] for event in qemu.events]:
            await asyncio.sleep(0.05)
    vm.run(asyncio.wait_for(powerdown_reported(), 10))
    status = vm.kill_qemu()
    assert status == -9
    assert "QEMU killed by SIGKILL" in vm.guest.qemu.failure("VM lost")
    assert "vmm-task ready" in vm.guest.qemu.failure("VM lost")  # the console tail is kept


def test_agent_never_ready_is_named(vm_factory):
    with pytest.raises(VmError) as err:
        vm_factory(boot_timeout_s=0.3)
    assert err.value.stage == "agent"
    assert "agent not ready within 0.3 s (no 'vmm-task ready' on the console)" in str(err.value)
