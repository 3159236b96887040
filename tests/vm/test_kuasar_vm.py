"""Our guest image driven as Kuasar's vmm-sandboxer drives its own (kuasar-io/kuasar
vmm/sandbox/src), in a VM laid out like Kuasar's QEMU VM (qemu/factory.rs): a pci-bridge that
takes hot-plugged disks and a virtio-serial bus that takes hot-plugged stdio ports, the shared
directory over 9p (Kuasar's default share_fs). The vsock is our hybrid transport (there is no
vhost-vsock here). Call by call as Kuasar's host: SetupSandbox, the QMP hot-plugs (io.rs
attach_pipe, storage/mod.rs handle_block_device), the files in the shared directory
(tests/kuasar_host.py), then containerd's own Task requests, and the debug console.

A port's chardev is QEMU's `pipe` on `<path>.in`/`<path>.out`: Kuasar hands QEMU containerd's
single FIFO, which QEMU would then read as well as write; the guest side is the same."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from containerd_streams import ContainerdStream
from host_sandboxer.vmm.vm import GuestVm
from tests.kuasar_host import KuasarHost, overlay_rootfs
from tests.vm.conftest import RunningVm
from vmm_common.protos.containerd.task.v2 import shim_pb2 as pb
from vmm_common.protos.containerd.types import mount_pb2
from vmm_common.protos.kuasar import sandbox_pb2 as sandbox_pb

TASK = "containerd.task.v2.Task"
BRIDGE_SLOT = 0x10
KUASAR_DEVICES = ("-device", f"pci-bridge,bus=pcie.0,id=pci-bridge-0,chassis_nr=1,shpc=on,"
                             f"addr={BRIDGE_SLOT:x}",
                  "-device", "virtio-serial-pci,id=serial0")
APPLETS = ("sh", "echo", "cat", "grep", "sleep", "touch", "test", "[")
INIT = ("echo hostname=$(cat /etc/hostname); cat /data/host.txt /disk/on-disk.txt; "
        "grep ' /cache ' /proc/mounts; echo hi > /cache/x; echo ready; "
        "while [ ! -e /cache/stop ]; do sleep 0.1; done; exit 5")


class KuasarLayoutVm(GuestVm):
    def _spec(self, *args, **kwargs):
        return dataclasses.replace(super()._spec(*args, **kwargs), extra_args=KUASAR_DEVICES)


@pytest.fixture
def kuasar_vm(vm_config, vm_loop, tmp_path):
    config = dataclasses.replace(vm_config)
    config.sharefs = dataclasses.replace(config.sharefs, type="9p")
    share = tmp_path / "share"
    share.mkdir()
    run_dir = Path(tempfile.mkdtemp(prefix="vmtest-"))
    guest = KuasarLayoutVm(config, run_dir, name="vmtest-kuasar", share_dir=share,
                           kernel_params=["task.debug"])
    vm_loop.run(guest.start())
    vm = RunningVm(guest, vm_loop, share)
    try:
        yield vm
    finally:
        vm.close()
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def host(kuasar_vm):
    kuasar = KuasarHost(kuasar_vm.share_dir, "/run/kuasar/state", "/run/kuasar/storage/containers",
                        "/run/sandbox-ns")
    yield kuasar
    kuasar.close()


@pytest.fixture
def host_volumes(tmp_path):
    """An emptyDir with medium Memory (a host tmpfs), a hostPath directory, an ext4 disk image
    and a busybox tree for the image's lower layer."""
    empty_dir = tmp_path / "pods/uid1/volumes/kubernetes.io~empty-dir/cache"
    empty_dir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(empty_dir)], check=True)
    data = tmp_path / "data"
    data.mkdir()
    (data / "host.txt").write_text("from the host\n")
    disk_tree = tmp_path / "disk-tree"
    disk_tree.mkdir()
    (disk_tree / "on-disk.txt").write_text("from the disk\n")
    disk = tmp_path / "disk.img"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(disk_tree), str(disk), "8M"], check=True)
    lower = tmp_path / "image"
    (lower / "bin").mkdir(parents=True)
    for d in ("proc", "sys", "dev", "tmp", "etc"):
        (lower / d).mkdir()
    shutil.copy2("/bin/busybox", lower / "bin" / "busybox")
    for applet in APPLETS:
        (lower / "bin" / applet).symlink_to("busybox")
    try:
        yield {"cache": empty_dir, "data": data, "disk": disk, "lower": lower}
    finally:
        subprocess.run(["umount", "-l", str(empty_dir)], check=True)


def oci_spec(cid: str, script: str) -> dict:
    """containerd's spec for a CRI container (the parts the test needs)."""
    return {
        "ociVersion": "1.3.0",
        "process": {"user": {"uid": 0, "gid": 0}, "args": ["sh", "-c", script], "cwd": "/",
                    "env": ["PATH=/bin"], "terminal": False},
        "root": {"path": "rootfs"},
        "hostname": cid[:63],
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        ],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
                  "cgroupsPath": f"/k8s.io/{cid}"},
    }


def volume(destination: str, source: Path, mode: str = "rw") -> dict:
    return {"destination": destination, "type": "bind", "source": str(source),
            "options": ["rbind", "rprivate", mode]}


class Ports:
    """Kuasar's attach_pipe over QMP: one virtserialport per stream, named like its chardev."""

    def __init__(self, vm: RunningVm, directory: Path):
        self.vm = vm
        self.directory = directory
        self.count = 0

    async def attach(self) -> tuple[str, Path]:
        """(the port's name, the FIFO QEMU writes the guest's output to)."""
        self.count += 1
        name = f"chardev{self.count}"
        prefix = self.directory / name
        for end in (".in", ".out"):
            os.mkfifo(f"{prefix}{end}")
        qmp = self.vm.guest.qemu.qmp
        await qmp.execute("chardev-add", {"id": name, "backend": {
            "type": "pipe", "data": {"device": str(prefix)}}})
        await qmp.execute("device_add", {"driver": "virtserialport", "id": f"virtioserial{self.count}",
                                         "chardev": name, "name": name})
        return name, Path(f"{prefix}.out")


async def unplug(vm: RunningVm, device_id: str, timeout: float = 30.0) -> None:
    """device_del, as Kuasar's hot_detach, until QEMU let the device go: a PCI device only once
    the guest released it (PCI hot-unplug in the guest kernel)."""
    qmp = vm.guest.qemu.qmp
    await qmp.execute("device_del", {"id": device_id})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while any(p["name"] == device_id
              for p in await qmp.execute("qom-list", {"path": "/machine/peripheral"})):
        assert loop.time() < deadline, f"QEMU still has {device_id} {timeout:.0f}s after device_del"
        await asyncio.sleep(0.1)


async def read_until(fifo: Path, marker: bytes, timeout: float = 120.0) -> bytes:
    """What QEMU wrote to `fifo` up to `marker` (QEMU keeps it open: no EOF)."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    loop = asyncio.get_running_loop()
    data = b""
    try:
        deadline = loop.time() + timeout
        while marker not in data:
            assert loop.time() < deadline, f"no {marker!r} from {fifo.name}, got {data!r}"
            try:
                data += os.read(fd, 65536)
            except BlockingIOError:
                await asyncio.sleep(0.05)
    finally:
        os.close(fd)
    return data

async def setup_sandbox(client) -> None:
    """Kuasar's SetupSandbox with a PodSandboxConfig naming only the hostname (no network)."""
    setup = sandbox_pb.SetupSandboxRequest()
    setup.config.type_url = "PodSandboxConfig"
    setup.config.value = json.dumps({"hostname": "kuasar-vm"}).encode()
    await client.call("grpc.SandboxService", "SetupSandbox", setup, empty_pb2.Empty, timeout=30)



def test_kuasar_host_runs_containers_in_our_guest(kuasar_vm, host, host_volumes, tmp_path):
    vm = kuasar_vm
    volumes = host_volumes
    cid = f"k{uuid.uuid4().hex[:12]}"
    rootfs = overlay_rootfs(volumes["lower"], tmp_path / "snapshot")
    spec = oci_spec(cid, INIT)
    disk_mount = volume("/disk", volumes["disk"], "ro")
    spec["mounts"] += [volume("/cache", volumes["cache"]), volume("/data", volumes["data"], "ro"),
                       disk_mount]
    host.write_sandbox_files("kuasar-vm", "nameserver 192.0.2.53\n")
    ports = Ports(vm, tmp_path)
    containerd = "/run/containerd/io.containerd.runtime.v2.task/k8s.io"
    fifos = "/run/containerd/io.containerd.grpc.v1.cri/containers"

    async def scenario():
        client = await vm.client()

        async def call(method, request, response=empty_pb2.Empty, timeout=120.0):
            return await client.call(TASK, method, request, response, timeout=timeout)
        try:
            await setup_sandbox(client)

            # the disk: blockdev-add + device_add on the bridge, as handle_block_device
            qmp = vm.guest.qemu.qmp
            await qmp.execute("blockdev-add", {"driver": "raw", "node-name": "blk1", "read-only": True,
                                               "file": {"driver": "file",
                                                        "filename": str(volumes["disk"])}})
            await qmp.execute("device_add", {"driver": "virtio-blk-pci", "id": "virtio-blk1",
                                             "drive": "blk1", "bus": "pci-bridge-0", "addr": "03"})
            host.attach_block(cid, disk_mount, f"0000:{BRIDGE_SLOT:02x}:03.0", "ext4")

            stdout_port, stdout_fifo = await ports.attach()
            host.append_container(cid, spec, rootfs, io={
                "stdin": "", "stdout": stdout_port, "stderr": "", "terminal": False})
            create = pb.CreateTaskRequest(
                id=cid, bundle=f"{containerd}/{cid}", stdout=f"{fifos}/{cid}/io/1/{cid}-stdout",
                rootfs=[mount_pb2.Mount(type=m["type"], source=m["source"], options=m["options"])
                        for m in rootfs])
            await call("Create", create, pb.CreateTaskResponse)
            await call("Start", pb.StartRequest(id=cid), pb.StartResponse)
            init_output = await read_until(stdout_fifo, b"ready\n")
            state = await call("State", pb.StateRequest(id=cid), pb.StateResponse)

            exec_port, exec_fifo = await ports.attach()
            host.add_exec_io(cid, "probe", {"stdin": "", "stdout": exec_port, "stderr": "",
                                            "terminal": False})
            exec_request = pb.ExecProcessRequest(id=cid, exec_id="probe",
                                                 stdout=f"{fifos}/{cid}/io/2/probe-stdout")
            exec_request.spec.value = json.dumps({
                "args": ["sh", "-c", "cat /cache/x; touch /cache/stop; echo exec-done; exit 3"],
                "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}).encode()
            await call("Exec", exec_request)
            await call("Start", pb.StartRequest(id=cid, exec_id="probe"), pb.StartResponse)
            exec_output = await read_until(exec_fifo, b"exec-done\n")
            exec_exit = await call("Wait", pb.WaitRequest(id=cid, exec_id="probe"),
                                   pb.WaitResponse)
            await call("Delete", pb.DeleteRequest(id=cid, exec_id="probe"), pb.DeleteResponse)
            init_exit = await call("Wait", pb.WaitRequest(id=cid), pb.WaitResponse)
            await call("Delete", pb.DeleteRequest(id=cid), pb.DeleteResponse)
            # the host takes its devices back (process.rs, io.rs, storage/mod.rs detach_storage):
            # the guest unmounted the disk with its last container and lets it go
            for device in ("virtioserial1", "virtioserial2", "virtio-blk1"):
                await unplug(vm, device)

            reader, writer = await vm.guest.open_connection(1025)  # task.debug's console
            console = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            return init_output, state, exec_output, exec_exit, init_exit, console
        finally:
            await client.close()

    init_output, state, exec_output, exec_exit, init_exit, console = vm.run(scenario(),
                                                                            timeout=600)
    host.remove_container(cid)
    lines = init_output.decode().splitlines()
    assert lines[:3] == ["hostname=kuasar-vm", "from the host", "from the disk"], init_output
    assert lines[3].startswith("tmpfs /cache tmpfs ") and "size=8192k" in lines[3], init_output
    assert state.stdout.startswith("/dev/vport"), state
    assert exec_output == b"hi\nexec-done\n"
    assert (exec_exit.exit_status, init_exit.exit_status) == (3, 5)
    assert b"no shell in this guest" in console


def test_kuasar_host_streams_a_containers_stdio(kuasar_vm, host, host_volumes, tmp_path):
    """`io_type = "streaming"` with Kuasar's host: containerd dials the agent's task address
    itself for each stream (a connection of its own), before Create, and the io file passes
    the stream strings through (handler/io.rs); stdin, stdout and stderr over those streams."""
    vm = kuasar_vm
    cid = f"s{uuid.uuid4().hex[:12]}"
    address = "ttrpc+hvsock:///run/kuasar/task.vsock:1024"  # a hybrid-vsock task address; the agent ignores it
    io = {"stdin": f"{address}?streaming_id={cid}-stdin", "stdout": f"{address}?streaming_id={cid}-stdout",
          "stderr": f"{address}?streaming_id={cid}-stderr", "terminal": False}
    rootfs = overlay_rootfs(host_volumes["lower"], tmp_path / "snapshot")
    host.write_sandbox_files("kuasar-vm", "nameserver 192.0.2.53\n")
    host.append_container(cid, oci_spec(cid, "echo started; cat; echo to-stderr >&2; exit 7"), rootfs, io)
    typed = b"".join(b"line %d\n" % i for i in range(20_000))  # ~200 kB: many windows both ways

    async def scenario():
        client = await vm.client()
        connections = {name: await vm.client() for name in ("stdin", "stdout", "stderr")}

        async def call(method, request, response=empty_pb2.Empty):
            return await client.call(TASK, method, request, response, timeout=120.0)
        try:
            await setup_sandbox(client)
            streams = {name: await ContainerdStream.over(connection, io[name].rsplit("=", 1)[1])
                       for name, connection in connections.items()}  # CRI: before Create
            await call("Create", pb.CreateTaskRequest(
                id=cid, bundle=f"/run/containerd/io.containerd.runtime.v2.task/k8s.io/{cid}",
                stdin=io["stdin"], stdout=io["stdout"], stderr=io["stderr"],
                rootfs=[mount_pb2.Mount(type=m["type"], source=m["source"], options=m["options"])
                        for m in rootfs]), pb.CreateTaskResponse)
            await call("Start", pb.StartRequest(id=cid), pb.StartResponse)
            out = asyncio.ensure_future(streams["stdout"].read_all())
            err = asyncio.ensure_future(streams["stderr"].read_all())
            await streams["stdin"].write_all(typed)
            await streams["stdin"].close()
            outputs = await asyncio.wait_for(asyncio.gather(out, err), 300)
            exit_status = (await call("Wait", pb.WaitRequest(id=cid), pb.WaitResponse)).exit_status
            await call("Delete", pb.DeleteRequest(id=cid), pb.DeleteResponse)
            return outputs, exit_status
        finally:
            for connection in [client, *connections.values()]:
                await connection.close()

    (stdout, stderr), exit_status = vm.run(scenario(), timeout=600)
    host.remove_container(cid)
    assert stdout == b"started\n" + typed
    assert (stderr, exit_status) == (b"to-stderr\n", 7)
