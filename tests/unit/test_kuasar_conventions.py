"""The agent's reading of Kuasar's host conventions (vmm_task/kuasar/, docs/kuasar.md): which
requests follow them, io and storage files, the runc Options, and finding virtio-serial ports
and hot-plugged disks. Ports and disks are looked up in sysfs trees built here: this host has
neither hot-plugged virtio-serial ports nor virtio-blk disks (the VM test has the real ones)."""
import asyncio
import json
import os
import subprocess

import pytest
from google.protobuf import any_pb2

from vmm_common.protos.containerd.runc.v1 import oci_pb2
from vmm_task.container.errors import TaskError
from vmm_task.container.options import create_options
from vmm_task.container.stdio import Stdio
from vmm_task.kuasar import convention
from vmm_task.kuasar.pci import block_device
from vmm_task.kuasar.storages import StorageTable, parse_storages
from vmm_task.kuasar.virtio_ports import resolve_ports

NO_STDIO = Stdio("", "", "", False)


def _error(coro_or_call) -> TaskError:
    with pytest.raises(TaskError) as caught:
        if asyncio.iscoroutine(coro_or_call):
            asyncio.run(coro_or_call)
        else:
            coro_or_call()
    return caught.value


# -- which requests follow Kuasar's convention ----------------------------------------------------

def test_only_a_request_naming_another_bundle_than_the_shared_one_is_kuasars(tmp_path):
    share = tmp_path / "share"
    (share / "c1").mkdir(parents=True)
    assert convention.shared_bundle(str(share), "c1", "/run/containerd/x/c1") is None  # no spec
    (share / "c1" / "config.json").write_text("{}")
    assert convention.shared_bundle(str(share), "c1", "/run/containerd/x/c1") == str(share / "c1")
    assert convention.shared_bundle(str(share), "c1", "") == str(share / "c1")
    # our host names the shared bundle itself
    assert convention.shared_bundle(str(share), "c1", f"{share}/c1/") is None


def test_io_files_replace_the_request_stdio_and_an_execs_is_read_once(tmp_path):
    request = Stdio("", "/run/containerd/fifo-out", "", True)
    assert convention.init_stdio(str(tmp_path), "c1", request) == request  # no io file
    (tmp_path / "io-c1").write_text(json.dumps(
        {"stdin": "chardev1", "stdout": "chardev2", "stderr": None, "terminal": False}))
    assert convention.init_stdio(str(tmp_path), "c1", request) == \
        Stdio("chardev1", "chardev2", "", False)
    (tmp_path / "io-c1-e1").write_text(json.dumps({"stdout": "vsock://2:4000",
                                                   "terminal": False}))
    # an exec's terminal is the request's
    assert convention.exec_stdio(str(tmp_path), "c1", "e1", request) == \
        Stdio("", "vsock://2:4000", "", True)
    assert not (tmp_path / "io-c1-e1").exists()
    assert (tmp_path / "io-c1").exists()
    for bad in ("[1]", "not json", json.dumps({"stdout": 5}), json.dumps({"terminal": "yes"})):
        (tmp_path / "io-c2").write_text(bad)
        error = _error(lambda: convention.init_stdio(str(tmp_path), "c2", request))
        assert error.code == "INVALID_ARGUMENT" and "io-c2" in str(error)


def test_storages_from_the_annotation_else_the_storage_file(tmp_path):
    tmpfs = {"host_source": "/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/c",
             "type": "bind", "id": "storage2", "device_id": None, "ref_container": {"c1": 1},
             "need_guest_handle": True, "source": "tmpfs", "driver": "ephemeral",
             "driver_options": [], "fstype": "tmpfs", "options": ["size=16384k", "shared"],
             "mount_point": "/run/kuasar/storage/containers/storage2"}
    (tmp_path / "config.json").write_text(json.dumps({"process": {}}))
    assert convention.storages(str(tmp_path), "c1") == []
    (tmp_path / "storage-c1").write_text(json.dumps([tmpfs]))
    (found,) = convention.storages(str(tmp_path), "c1")
    assert (found.driver, found.source, found.fstype, found.options, found.mount_point) == \
        ("ephemeral", "tmpfs", "tmpfs", ("size=16384k", "shared"), tmpfs["mount_point"])
    (tmp_path / "config.json").write_text(json.dumps(
        {"annotations": {"io.kuasar.storages": "[]"}}))
    assert convention.storages(str(tmp_path), "c1") == []  # the annotation wins


@pytest.mark.parametrize("bad, words", [
    ("{}", "must be a JSON list"), ("[1]", "not an object"),
    ('[{"driver": "ephemeral", "fstype": "tmpfs", "mount_point": "run/x"}]', "mount_point"),
    ('[{"driver": "ephemeral", "fstype": "tmpfs", "mount_point": "/"}]', "mount_point"),
    ('[{"driver": "ephemeral", "fstype": "tmpfs", "mount_point": "/a/../b"}]', "mount_point"),
    ('[{"driver": "", "fstype": "tmpfs", "mount_point": "/a"}]', "driver and fstype"),
    ('[{"driver": "blk", "fstype": "ext4", "mount_point": "/a", "options": "ro"}]', "options"),
    ('[{"driver": 1, "fstype": "ext4", "mount_point": "/a"}]', "driver must be a string")])
def test_bad_storages_are_invalid_arguments(bad, words):
    error = _error(lambda: parse_storages(bad, "annotation"))
    assert error.code == "INVALID_ARGUMENT" and words in str(error), error


# -- the runc Options ----------------------------------------------------------------------------

def test_runc_options_are_read_and_other_types_ignored():
    packed = any_pb2.Any(type_url="containerd.runc.v1.Options", value=oci_pb2.Options(
        no_pivot_root=True, no_new_keyring=True, io_uid=1000, binary_name="runc",
        systemd_cgroup=True).SerializeToString())
    options = create_options(packed, "create of c1")
    assert (options.no_pivot_root, options.no_new_keyring, options.io_owner) == \
        (True, True, (1000, 0))
    assert create_options(any_pb2.Any(type_url="x.Other", value=b"\xff"), "c") == \
        create_options(None, "c")
    assert create_options(packed, "c")._replace(io_owner=None) == \
        create_options(any_pb2.Any(type_url="types.example/containerd.runc.v1.Options",
                                   value=oci_pb2.Options(no_pivot_root=True, no_new_keyring=True)
                                   .SerializeToString()), "c")
    error = _error(lambda: create_options(
        any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"\xff\xff"), "create of c1"))
    assert error.code == "INVALID_ARGUMENT" and "create of c1" in str(error)


# -- virtio-serial ports ----------------------------------------------------------------------------

def _ports(tmp_path, names: dict[str, str]):
    sysfs = tmp_path / "virtio-ports"
    for device, name in names.items():
        (sysfs / device).mkdir(parents=True)
        (sysfs / device / "name").write_text(name + "\n" if name else "")
    return str(sysfs)


def test_port_names_become_their_devices_and_paths_stay(tmp_path):
    sysfs = _ports(tmp_path, {"vport0p0": "", "vport1p1": "chardev3", "vport1p2": "chardev4"})
    stdio = Stdio("chardev4", "chardev3", "/run/kuasar/state/c1/err", False)
    assert asyncio.run(resolve_ports(stdio, sysfs, "/dev", timeout=0.1)) == \
        Stdio("/dev/vport1p2", "/dev/vport1p1", "/run/kuasar/state/c1/err", False)


def test_a_port_named_late_is_waited_for_and_a_missing_one_named(tmp_path):
    sysfs = _ports(tmp_path, {"vport1p1": ""})

    async def named_later():
        await asyncio.sleep(0.1)
        (tmp_path / "virtio-ports" / "vport1p1" / "name").write_text("chardev9\n")

    async def both():
        naming = asyncio.ensure_future(named_later())
        found = await resolve_ports(Stdio("", "chardev9", "", False), sysfs, "/dev", timeout=5)
        await naming
        return found

    assert asyncio.run(both()).stdout == "/dev/vport1p1"
    error = _error(resolve_ports(Stdio("", "", "chardev1", False), sysfs, "/dev", timeout=0.1))
    assert error.code == "INVALID_ARGUMENT" and "chardev1" in str(error)
    assert "vport1p1=chardev9" in str(error)
    error = _error(resolve_ports(Stdio("chardev1", "", "", False), str(tmp_path / "none")))
    assert error.code == "INVALID_ARGUMENT" and "has none" in str(error)


# -- hot-plugged disks ----------------------------------------------------------------------------

def _pci(tmp_path):
    """A guest's sysfs: a pci-bridge at 00:02.0 (secondary bus 01) with a disk in slot 03, and a
    disk on the root bus at 00:05.0."""
    sysfs = tmp_path / "sys"
    bridge = sysfs / "devices/pci0000:00/0000:00:02.0"
    behind = bridge / "0000:01:03.0"
    (behind / "virtio6/block/vdb").mkdir(parents=True)
    (sysfs / "devices/pci0000:00/0000:00:05.0/virtio3/block/vda").mkdir(parents=True)
    devices = sysfs / "bus/pci/devices"
    devices.mkdir(parents=True)
    for address, target in (("0000:00:02.0", bridge), ("0000:01:03.0", behind),
                            ("0000:00:05.0", sysfs / "devices/pci0000:00/0000:00:05.0")):
        (devices / address).symlink_to(target)
    (sysfs / "bus/pci/rescan").write_text("")
    return sysfs


def test_disks_by_kuasars_bridge_slot_address_or_a_real_one(tmp_path):
    sysfs = _pci(tmp_path)

    def find(address, timeout=0.1):
        return asyncio.run(block_device(address, "storage1", str(sysfs), "/dev", timeout))

    assert find("0000:02:03.0") == "/dev/vdb"  # Kuasar's: bridge in slot 02, disk in slot 03
    assert find("0000:01:03.0") == "/dev/vdb"  # a real address
    assert find("0000:00:05.0") == "/dev/vda"
    assert (sysfs / "bus/pci/rescan").read_text() == "1"
    error = _error(lambda: find("0000:02:04.0"))
    assert error.code == "UNKNOWN" and "0000:02:04.0" in str(error)
    error = _error(lambda: find("vdb"))
    assert error.code == "INVALID_ARGUMENT" and "not a PCI address" in str(error)


# -- storages the guest mounts ----------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="mounts tmpfs: root needed")
def test_a_volume_is_mounted_once_and_unmounted_with_its_last_container(tmp_path):
    def storage(volume, point, driver="ephemeral"):
        return {"host_source": volume, "type": "bind", "id": point, "driver": driver,
                "source": "tmpfs", "fstype": "tmpfs", "options": ["size=1m"],
                "mount_point": str(tmp_path / point)}

    def mounted(point):
        return str(tmp_path / point) in subprocess.run(
            ["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True).stdout.split()

    cache = parse_storages(json.dumps([storage("/v/cache", "s1")]), "test")
    both = parse_storages(json.dumps([storage("/v/cache", "s1"), storage("/v/tmp", "s2")]), "t")
    broken = parse_storages(json.dumps([storage("/v/other", "s3"),
                                        storage("/v/nfs", "s4", driver="nfs")]), "test")
    table = StorageTable()

    async def scenario():
        await table.acquire("c1", cache)
        await table.acquire("c2", both)
        with pytest.raises(TaskError):
            await table.acquire("c3", broken)
        return mounted("s1"), mounted("s2"), mounted("s3")

    try:
        assert asyncio.run(scenario()) == (True, True, False)  # c3's first is undone
        assert not (tmp_path / "s3").exists()
        table.release("c1")
        assert mounted("s1") and mounted("s2")
        table.release("c2")
        assert not mounted("s1") and not mounted("s2")
        assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()
    finally:
        for point in ("s1", "s2", "s3"):
            subprocess.run(["umount", str(tmp_path / point)], capture_output=True)
