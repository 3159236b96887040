"""The image from `make guest-image` boots in QEMU (TCG, memfd shared memory, virtiofs through
virtiofsd, hybrid vsock) and its PID 1 announces itself on the serial console."""
import json
import re

import pytest

from initrd import debian, guest_runtime
from kernel import build as kernel_build


def test_guest_boots_to_vmm_task_ready(vm, guest_image):
    console = vm.console_text()
    ready = [line for line in console.splitlines() if "vmm-task ready" in line]
    assert len(ready) == 1, console[-3000:]
    # The kernel ran the initrd's /init (the Nuitka agent), not a fallback.
    assert "Run /init as init process" in console
    assert "Kernel panic" not in console
    assert vm.timeline.agent_ready_s > vm.timeline.kernel_init_s > 0


def test_manifest_describes_the_booted_image(guest_image):
    manifest = json.loads(guest_image.manifest.read_text())
    assert manifest["initrd"]["size"] == guest_image.initrd.stat().st_size
    assert manifest["kernel"]["size"] == guest_image.kernel.stat().st_size
    assert manifest["rootfs"]["size"] == guest_image.rootfs.stat().st_size
    assert manifest["rootfs"]["filesystem"] == "erofs"
    assert re.fullmatch(r"6\.1\.\d+", manifest["kernel"]["release"])
    paths = {f["path"]: f for f in manifest["files"]}
    assert paths["/init"]["target"] == "sbin/init"
    assert paths["/sbin/init"]["target"].endswith("/vmm-task")
    assert paths["/usr/lib/vmm-task/vmm-task"]["size"] > 0
    assert not [p for p in paths if re.search(r"(^|/)(_ssl|_hashlib|grpc)", p)]
    # the runtime: the pinned Debian 13 package, its libraries and loader in a directory of their own
    pins = {pin.name: pin.version for pin in debian.read_pins(guest_runtime.PINS)}
    packages = {p["name"]: p for p in manifest["packages"]}
    assert packages[manifest["runtime"]]["version"] == pins[manifest["runtime"]]
    assert {name: p["version"] for name, p in packages.items()} == {n: pins[n] for n in packages}
    assert all(re.fullmatch(r"[0-9a-f]{64}", p["sha256"]) for p in packages.values())
    assert paths[f"/{guest_runtime.RUNTIMES[manifest['runtime']]}"]["size"] > 0
    assert paths[f"{guest_runtime.GUEST_LIB_DIR}/ld-linux-x86-64.so.2"]["size"] > 0


def test_the_kernel_names_no_build_machine_date_or_count(guest_image):
    """The version string in the kernel (its `linux_banner`) takes the clock, the object
    directory's build count and user@host unless kernel/build.py fixes them: a cold rebuild then
    differed from the cached kernel (the first cold `make reproducible-check`). build/guest/kernel
    is the uncompressed ELF QEMU boots through the PVH entry, so the banner is there as it is."""
    image = guest_image.kernel.read_bytes()
    assert image[:4] == b"\x7fELF"
    start = image.index(b"Linux version ") + len(b"Linux version ")
    version = image[start:image.index(b"\n", start)].decode()
    env = kernel_build.REPRODUCIBLE_ENV
    release = json.loads(guest_image.manifest.read_text())["kernel"]["release"]
    assert re.fullmatch(rf"{re.escape(release)} \({env['KBUILD_BUILD_USER']}@{env['KBUILD_BUILD_HOST']}\) "
                        rf"\(.*\) #1 SMP( PREEMPT\w*)* {re.escape(env['KBUILD_BUILD_TIMESTAMP'])}", version), version


def test_rebuilding_from_the_same_inputs_gives_the_same_initrd_and_root_image(guest_image, tmp_path):
    from initrd import agent, guest_image as builder
    from kernel import build as kernel_build

    manifest = json.loads(guest_image.manifest.read_text())
    if agent.cache_key() != manifest["agent"]["cache_key"]:
        pytest.skip("the agent's sources changed since build/guest was made: run make guest-image")
    rebuilt = builder.build(tmp_path, manifest["runtime"], manifest["debug"],
                            manifest["initrd"]["compression"], kernel_build.default_cache())
    assert rebuilt["initrd"]["sha256"] == manifest["initrd"]["sha256"]
    assert (tmp_path / "initrd.img").read_bytes() == guest_image.initrd.read_bytes()
    assert rebuilt["rootfs"]["sha256"] == manifest["rootfs"]["sha256"]
