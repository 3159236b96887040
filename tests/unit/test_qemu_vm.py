"""GuestVm's checks before anything is spawned: image files present, socket paths short enough."""
import asyncio
import dataclasses

import pytest

from host_sandboxer.config import Config
from host_sandboxer.vmm.vm import UNIX_PATH_MAX, GuestVm, VmError


def config_with_image(tmp_path, kernel_exists=True) -> Config:
    (tmp_path / "initrd.img").write_bytes(b"initrd")
    if kernel_exists:
        (tmp_path / "kernel").write_bytes(b"kernel")
    config = Config()
    config.vm = dataclasses.replace(config.vm, kernel=tmp_path / "kernel", initrd=tmp_path / "initrd.img")
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


def test_run_dir_too_deep_for_unix_sockets(tmp_path):
    deep = tmp_path / ("d" * (UNIX_PATH_MAX - len(str(tmp_path))))
    err = start(GuestVm(config_with_image(tmp_path), deep))
    assert err.stage == "config"
    assert f"socket path {deep}/vhost-vsock.sock is longer than {UNIX_PATH_MAX} bytes" in str(err)
