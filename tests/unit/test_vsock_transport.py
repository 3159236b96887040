"""Transport selection and QEMU arguments. This host has no /dev/vhost-vsock, so the kernel
transport's dial and CID ioctl cannot run here: its usability probe is pointed at stand-in
paths and the CID probe is injected; everything else is the real code."""

import asyncio
import errno
import os
import socket

import pytest

from host_sandboxer import vsock
from host_sandboxer.vsock import kernel
from host_sandboxer.vsock.hybrid import HybridVsock
from host_sandboxer.vsock.kernel import CidAllocator, KernelVsock


def test_auto_picks_kernel_only_when_usable():
    assert vsock.choose_kind("auto", kernel_usable=lambda: True) == "kernel"
    assert vsock.choose_kind("auto", kernel_usable=lambda: False) == "hybrid"
    assert vsock.choose_kind("hybrid", kernel_usable=lambda: True) == "hybrid"
    with pytest.raises(RuntimeError, match="/dev/vhost-vsock"):
        vsock.choose_kind("kernel", kernel_usable=lambda: False)
    with pytest.raises(ValueError, match="expected one of"):
        vsock.choose_kind("vsock-over-carrier-pigeon")


def test_usable_needs_an_openable_device(tmp_path):
    assert not kernel.usable(str(tmp_path / "absent"))
    present = tmp_path / "vhost-vsock"
    present.write_bytes(b"")
    assert kernel.usable(str(present)) == hasattr(socket, "AF_VSOCK")
    present.chmod(0o000)
    if os.geteuid() != 0:
        assert not kernel.usable(str(present))


def test_this_host_has_no_kernel_vsock_so_auto_is_hybrid():
    if os.path.exists(kernel.VHOST_VSOCK_DEVICE):
        pytest.skip("this host has /dev/vhost-vsock")
    assert vsock.choose_kind("auto") == "hybrid"


def test_create_transport_builds_each_kind(tmp_path):
    hybrid = vsock.create_transport("auto", str(tmp_path), kernel_usable=lambda: False)
    assert isinstance(hybrid, HybridVsock) and hybrid.needs_shared_memory
    assert hybrid.uds_path == str(tmp_path / "vsock.sock")
    assert hybrid.qemu_args() == ["-chardev", f"socket,id=vsock0,path={tmp_path}/vhost-vsock.sock",
                                  "-device", "vhost-user-vsock-pci,chardev=vsock0"]
    cids = CidAllocator(is_free=lambda cid: True)
    first = vsock.create_transport("kernel", str(tmp_path), kernel_usable=lambda: True, cids=cids)
    second = vsock.create_transport("auto", str(tmp_path), kernel_usable=lambda: True, cids=cids)
    assert isinstance(first, KernelVsock) and not first.needs_shared_memory
    assert (first.guest_cid, second.guest_cid) == (3, 4)
    assert second.qemu_args() == ["-device", "vhost-vsock-pci,id=vsock0,guest-cid=4"]

    async def close_first():
        await first.start()
        await first.close()
        assert first.dead.done()
    asyncio.run(close_first())
    assert cids.allocate() == 3, "a closed transport gives its CID back"


def test_cid_allocator_skips_cids_held_elsewhere_and_reuses_released():
    held_by_other_processes = {3, 5}
    cids = CidAllocator(is_free=lambda cid: cid not in held_by_other_processes)
    assert [cids.allocate() for _ in range(3)] == [4, 6, 7]
    cids.release(6)
    assert cids.allocate() == 6
    with pytest.raises(ValueError, match="reserved"):
        KernelVsock(2)


def test_cid_probe_reports_eaddrinuse_as_taken(monkeypatch, tmp_path):
    device = tmp_path / "vhost-vsock"
    device.write_bytes(b"")
    seen = []

    def fake_ioctl(fd, request, arg):
        seen.append((request, arg))
        raise OSError(errno.EADDRINUSE, "in use")
    monkeypatch.setattr(kernel.fcntl, "ioctl", fake_ioctl)
    assert not kernel.cid_is_free(9, str(device))
    assert seen == [(kernel.VHOST_VSOCK_SET_GUEST_CID, (9).to_bytes(8, "little"))]


@pytest.mark.skipif(not os.path.exists(kernel.VHOST_VSOCK_DEVICE), reason="no /dev/vhost-vsock on this host")
def test_kernel_dial_to_an_absent_guest_fails():
    async def dial():
        t = KernelVsock(0xFFFF0000)
        await t.start()
        with pytest.raises(OSError):
            await asyncio.wait_for(t.open_connection(1024), 5)
        await t.close()
    asyncio.run(dial())


def test_a_connection_made_for_qemu_is_named_by_fd(tmp_path):
    hybrid = vsock.create_transport("hybrid", str(tmp_path), kernel_usable=lambda: False)
    assert hybrid.qemu_args(fd=9) == ["-chardev", "socket,id=vsock0,fd=9", "-device", "vhost-user-vsock-pci,chardev=vsock0"]
    kernel = vsock.create_transport("kernel", str(tmp_path), kernel_usable=lambda: True, cids=CidAllocator(lambda cid: True))
    assert kernel.qemu_args(vhostfd=8) == ["-device", "vhost-vsock-pci,id=vsock0,guest-cid=3,vhostfd=8"]
