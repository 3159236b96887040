"""Fixtures for whole-VM tests: the guest image, and booted VMs (QEMU TCG, hybrid vsock).

Usage from a test:

    def test_something(vm):                       # booted with defaults and a shared dir
        vm.call("grpc.SandboxService", "Check", CheckRequest(), Empty)
        async def scenario():                     # anything async runs on the VM's loop
            client = await vm.client()
            ...
            await client.close()
        vm.run(scenario())
        assert "vmm-task ready" in vm.console_text()

    def test_other(vm_factory):                   # extra kernel params, 9p, a given shared dir
        vm = vm_factory(kernel_params=["task.debug"], sharefs="9p", share_dir=my_dir)

    def test_pods(harness):                       # the real daemon, pods through the CRI-like client
        started = harness.cri.run_pod("pod1")

VMs run on one asyncio loop in a background thread for the whole session, so the vsock backend
and QEMU's sockets are served while the test thread blocks or asserts.  Every VM a test boots
is torn down after it, whatever the outcome; a QEMU or helper that outlives the VM's close()
fails that test.  Tests skip only when the image is absent
(`make test` builds it first, so in CI it never is).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Coroutine, Sequence

import pytest

from host_sandboxer.config import DEFAULT_IMAGE_DIR, Config, load_config
from host_sandboxer.vmm.vm import GuestVm
from leak_guard import fail_if_left, take_left_in

# Boot takes a few seconds under TCG; the margin covers a loaded 2-core machine.
BOOT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    manifest: Path
    rootfs: Path


class BackgroundLoop:
    """An asyncio loop in a daemon thread; `run()` executes a coroutine on it and waits."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vm-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine, timeout: float | None = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class RunningVm:
    """A booted guest: its console, ttrpc clients to the agent, its shared dir, QEMU control."""

    def __init__(self, guest: GuestVm, loop: BackgroundLoop, share_dir: Path | None):
        self.guest = guest
        self.loop = loop
        self.share_dir = share_dir
        self.timeline = guest.timeline

    def run(self, coro: Coroutine, timeout: float | None = 120.0) -> Any:
        """Run `coro` on the VM's loop and return its result."""
        return self.loop.run(coro, timeout)

    async def client(self, port: int | None = None):
        """A new vmm_common.ttrpc.Client to the agent (or a guest port); call on the VM loop."""
        return await self.guest.ttrpc_client(port)

    def call(self, service: str, method: str, request, response_type, timeout: float = 10.0):
        """One unary ttrpc call on a fresh connection, from the test thread."""
        async def once():
            client = await self.client()
            try:
                return await client.call(service, method, request, response_type, timeout=timeout)
            finally:
                await client.close()
        return self.run(once())

    def console_text(self) -> str:
        """The console log so far (the kept part, if it rotated)."""
        return self.guest.console.log_path.read_text(errors="replace")

    def kill_qemu(self) -> int:
        """SIGKILL QEMU and return its exit status once the launcher has noticed."""
        os.kill(self.guest.qemu.proc.pid, signal.SIGKILL)
        return self.run(asyncio.wait_for(asyncio.shield(self.guest.exited), 10))

    def close(self) -> None:
        self.run(self.guest.close())


def _image(directory: Path, target: str) -> GuestImage:
    image = GuestImage(directory / "kernel", directory / "initrd.img", directory / "manifest.json",
                       directory / "rootfs.img")
    missing = [str(p) for p in (image.kernel, image.initrd, image.rootfs) if not p.is_file()]
    if missing:
        pytest.skip(f"guest image absent ({', '.join(missing)}): run `make {target}`")
    return image


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return _image(DEFAULT_IMAGE_DIR, "guest-image")


@pytest.fixture(scope="session")
def runc_guest_image() -> GuestImage:
    """The same kernel and agent with runc in place of crun (`make guest-image-runc`)."""
    image = _image(DEFAULT_IMAGE_DIR.parent / "guest-runc", "guest-image-runc")
    manifest = json.loads(image.manifest.read_text())
    names = {entry["path"].rsplit("/", 1)[-1] for entry in manifest["files"]}
    assert manifest["runtime"] == "runc" and "runc" in names and "crun" not in names, \
        f"{image.manifest}: not a runc image"
    return image


@pytest.fixture(scope="session")
def debug_guest_image() -> GuestImage:
    """The image with busybox (`make guest-image-debug`): commands for ExecVMProcess."""
    return _image(DEFAULT_IMAGE_DIR.parent / "guest-debug", "guest-image-debug")


@pytest.fixture(scope="session")
def vm_loop():
    loop = BackgroundLoop()
    yield loop
    loop.close()


@pytest.fixture
def vm_config(guest_image) -> Config:
    """Defaults (accel auto: TCG here) with the built image and the hybrid vsock transport."""
    return config_for(guest_image)


@pytest.fixture
def debug_vm_config(debug_guest_image) -> Config:
    """vm_config with the debug image."""
    return config_for(debug_guest_image)


def config_for(guest_image: GuestImage) -> Config:
    config = load_config(None)
    config.vm = dataclasses.replace(config.vm, kernel=guest_image.kernel, initrd=guest_image.initrd,
                                    rootfs=guest_image.rootfs, boot_timeout_s=BOOT_TIMEOUT_S)
    config.vsock = dataclasses.replace(config.vsock, transport="hybrid")
    return config


@pytest.fixture
def vm_factory(vm_config, vm_loop, tmp_path):
    """boot(kernel_params=(), share_dir=None, sharefs=None, **vm_overrides) -> RunningVm.

    share_dir None: a fresh empty directory; sharefs "virtiofs" or "9p" (default: config);
    vm_overrides: fields of VmConfig (machine, memory_mib, ...).
    """
    started: list[RunningVm] = []
    run_dirs: list[str] = []

    def boot(kernel_params: Sequence[str] = (), share_dir: Path | None = None, sharefs: str | None = None,
             **vm_overrides) -> RunningVm:
        config = dataclasses.replace(vm_config, vm=dataclasses.replace(vm_config.vm, **vm_overrides))
        if sharefs is not None:
            config.sharefs = dataclasses.replace(config.sharefs, type=sharefs)
        if share_dir is None:
            share_dir = tmp_path / f"share{len(run_dirs)}"
            share_dir.mkdir()
        # Sockets need short paths (108 bytes): not pytest's deep tmp_path.
        run_dirs.append(tempfile.mkdtemp(prefix="vmtest-"))
        guest = GuestVm(config, Path(run_dirs[-1]), name=f"vmtest-{len(run_dirs)}", share_dir=share_dir,
                        kernel_params=kernel_params)
        vm_loop.run(guest.start())
        started.append(RunningVm(guest, vm_loop, share_dir))
        return started[-1]

    yield boot
    for vm in started:
        vm.close()
    left = [take_left_in(Path(run_dir)) for run_dir in run_dirs]  # what close() did not stop
    for run_dir in run_dirs:
        shutil.rmtree(run_dir, ignore_errors=True)
    for found in left:
        fail_if_left(found)


@pytest.fixture
def harness(guest_image):
    """The real vmm-sandboxer on a private work dir (daemon_harness.Harness), closed after."""
    from daemon_harness import Harness
    h = Harness()
    yield h
    h.close()


@pytest.fixture
def vm(vm_factory) -> RunningVm:
    """A guest booted with the defaults and an empty shared directory."""
    return vm_factory()
