"""GuestVm's start-up failures that need no guest image: missing image files, socket paths too
long, no QEMU binary, QEMU refusing the kernel (real QEMU, a file that is no kernel); and its
close, asked for by several at once."""
import asyncio
import dataclasses

import pytest

from host_sandboxer.config import Config
from host_sandboxer.vmm.vm import TEMPLATE_PARAMS, UNIX_PATH_MAX, GuestVm, VmError


def config_with_image(tmp_path, kernel_exists=True) -> Config:
    (tmp_path / "initrd.img").write_bytes(b"initrd")
    if kernel_exists:
        (tmp_path / "kernel").write_bytes(b"kernel")
    config = Config()
    config.vm = dataclasses.replace(config.vm, kernel=tmp_path / "kernel", initrd=tmp_path / "initrd.img",
                                    image="initrd")
    config.vsock = dataclasses.replace(config.vsock, transport="hybrid")  # needs no /dev/vhost-vsock
    return config


def start(vm: GuestVm) -> VmError:
    with pytest.raises(VmError) as err:
        asyncio.run(vm.start())
    return err.value


def test_missing_kernel_is_named(tmp_path):
    err = start(GuestVm(config_with_image(tmp_path, kernel_exists=False), tmp_path / "run"))
    assert err.stage == "image"
    assert str(err) == f"no kernel at {tmp_path / 'kernel'} (run `make guest-image` or set vm.kernel)"
    assert not (tmp_path / "run").exists()


def test_missing_root_image_is_named_when_booting_from_pmem(tmp_path):
    config = config_with_image(tmp_path)
    config.vm = dataclasses.replace(config.vm, image="pmem", rootfs=tmp_path / "rootfs.img")
    err = start(GuestVm(config, tmp_path / "run"))
    assert err.stage == "image"
    assert str(err) == f"no rootfs at {tmp_path / 'rootfs.img'} (run `make guest-image` or set vm.rootfs)"


def test_run_dir_too_deep_for_unix_sockets(tmp_path):
    deep = tmp_path / ("d" * (UNIX_PATH_MAX - len(str(tmp_path))))
    err = start(GuestVm(config_with_image(tmp_path), deep))
    assert err.stage == "config"
    assert f"socket path {deep}/vhost-vsock.sock is longer than {UNIX_PATH_MAX} bytes" in str(err)


def test_missing_qemu_binary_is_named(tmp_path):
    config = config_with_image(tmp_path)
    config.vm = dataclasses.replace(config.vm, qemu=str(tmp_path / "no-qemu"))
    err = start(GuestVm(config, tmp_path / "run"))
    assert err.stage == "qemu"
    assert str(err) == f"cannot run {tmp_path / 'no-qemu'}: No such file or directory"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["console.log"]  # QEMU never ran


def test_qemu_exiting_at_start_is_reported_with_its_output(tmp_path):
    err = start(GuestVm(config_with_image(tmp_path), tmp_path / "run"))  # "kernel" is 6 bytes of text
    assert err.stage == "qemu"
    first, *rest = str(err).splitlines()
    assert first == "QEMU failed to start: QEMU exited with status 1"
    assert rest[0] == "QEMU output:" and "kernel" in rest[1]
    assert rest[-2:] == ["console tail:", "(no console output)"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["console.log", "qemu.log"]


def test_close_runs_once_for_every_caller_and_a_cancelled_one_does_not_cut_it_short(tmp_path):
    """A pod's VM watch and its Shutdown may close the VM at once (sandbox/lifecycle.py): the
    close runs once, each caller returns when it is done, and cancelling one (stop() cancels the
    watch) does not stop it halfway (the vsock backend is told last: cut short, it was left
    running). The transport is a stand-in: what is measured is GuestVm's own ordering."""
    class SlowTransport:
        def __init__(self):
            self.begun = self.finished = 0

        async def close(self):
            self.begun += 1
            await asyncio.sleep(0.2)
            self.finished += 1

    async def main():
        vm = GuestVm(config_with_image(tmp_path), tmp_path / "run")
        vm.transport = SlowTransport()
        first = asyncio.ensure_future(vm.close())
        await asyncio.sleep(0.05)
        first.cancel()
        await vm.close()
        return vm.transport

    transport = asyncio.run(main())
    assert (transport.begun, transport.finished) == (1, 1)


def test_only_a_template_and_its_clones_tell_the_agent_to_preload(tmp_path):
    """task.preload costs a cold boot its imports before ready: only the template's guest gets it
    (its clones inherit what it imported), never a booted pod's."""
    vm = GuestVm(config_with_image(tmp_path), tmp_path / "run")
    clonable = vm.clonable_spec(tmp_path / "template.ram", tmp_path / "run").kernel_params
    assert "task.preload" in clonable and "task.sharefs_type=virtiofs" in clonable
    assert "task.preload" not in vm._spec(None, ()).kernel_params


def test_the_template_trial_boots_its_templates_as_the_daemon_does(tmp_path):
    """bench.template_trial's templates import a pod's modules before they are saved too, else
    its clones' figures are not the daemon's (it booted them without task.preload)."""
    from bench import template_trial

    vm = GuestVm(config_with_image(tmp_path), tmp_path / "run")
    daemons = vm.clonable_spec(tmp_path / "template.ram", tmp_path / "run").kernel_params
    trials = template_trial._spec(config_with_image(tmp_path), tmp_path / "run", "template").kernel_params
    assert "task.preload" in TEMPLATE_PARAMS
    assert [p for p in TEMPLATE_PARAMS if p not in daemons or p not in trials] == []
