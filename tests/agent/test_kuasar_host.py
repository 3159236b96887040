"""Our agent (dev mode, in a network namespace of its own) driven as Kuasar's vmm-sandboxer and
containerd drive Kuasar's own guest, call by call; tests/kuasar_host.py prepares the shared
directory as Kuasar's host does. The Task requests carry what containerd sends Kuasar's guest:
containerd's own bundle path, snapshot mounts and FIFO paths, which mean nothing in a guest and
are ignored for the shared directory's bundle (docs/kuasar.md).

In dev mode there is no virtio-serial: the io files carry `unix://` addresses, which Kuasar's
host passes through as it does `vsock://` (the ports themselves: tests/vm/test_kuasar_vm.py)."""
import asyncio
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from tests.agent.conftest import Agent, oci_spec
from tests.kuasar_host import KuasarHost, overlay_rootfs
from vmm_common.protos.containerd.runc.v1 import oci_pb2
from vmm_common.protos.containerd.task.v2 import shim_pb2 as pb
from vmm_common.protos.containerd.types import mount_pb2
from vmm_common.protos.kuasar import sandbox_pb2 as sandbox_pb

SANDBOX = "grpc.SandboxService"
MAC = "02:00:00:00:4b:01"
CONTAINERD_BUNDLES = "/run/containerd/io.containerd.runtime.v2.task/k8s.io"
CRI_FIFOS = "/run/containerd/io.containerd.grpc.v1.cri/containers"


@pytest.fixture(scope="module")
def kuasar_agent(tmp_path_factory, busybox_rootfs, crun_cgroups, runtime):
    """The agent with a shared directory (--state-dir) and a network namespace to manage."""
    workdir = tmp_path_factory.mktemp("kuasar")
    share = workdir / "share"
    share.mkdir()
    agent = Agent(workdir, runtime, "--state-dir", str(share), "--manage-network",
                  wrapper=("unshare", "--net"))
    yield agent, share
    try:
        assert agent.alive(), f"the agent died:\n{agent.log.read_text()[-3000:]}"
    finally:
        agent.stop()


@pytest.fixture
def host(kuasar_agent, tmp_path):
    agent, share = kuasar_agent
    kuasar = KuasarHost(share, str(share), str(tmp_path / "guest-storages"),
                        str(agent.run_dir / "sandbox-ns"))
    yield kuasar
    kuasar.close()


@pytest.fixture
def empty_dir(tmp_path):
    """A kubelet emptyDir with medium Memory: a tmpfs on the host."""
    path = tmp_path / "pods" / "uid1" / "volumes" / "kubernetes.io~empty-dir" / "cache"
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)], check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=True)


def containerd_create(cid: str, rootfs: list[dict], options=None) -> pb.CreateTaskRequest:
    """Task.Create as containerd sends it: its own bundle, snapshot mounts and CRI's FIFO."""
    request = pb.CreateTaskRequest(
        id=cid, bundle=f"{CONTAINERD_BUNDLES}/{cid}",
        rootfs=[mount_pb2.Mount(type=m["type"], source=m["source"], options=m["options"])
                for m in rootfs],
        stdout=f"{CRI_FIFOS}/{cid}/io/1/{cid}-stdout")
    if options is not None:
        request.options.type_url = "containerd.runc.v1.Options"  # containerd's typeurl name
        request.options.value = options.SerializeToString()
    return request


def volume(destination: str, source: Path, mode: str = "rw") -> dict:
    """A CRI bind mount (an emptyDir or a hostPath volume)."""
    return {"destination": destination, "type": "bind", "source": str(source),
            "options": ["rbind", "rprivate", mode]}


async def read_all(path: Path, timeout: float = 60.0) -> bytes:
    """Connect to the agent's `unix://` stdio listener and read to EOF."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def mounted(point: str) -> bool:
    return any(line.split()[4] == point for line in Path("/proc/self/mountinfo").open())


INIT = ("echo hostname=$(cat /etc/hostname); cat /data/host.txt; grep ' /cache ' /proc/mounts; "
        "grep ' / ' /proc/mounts; {keyring}; "
        "echo hi > /cache/x; while [ ! -e /cache/stop ]; do sleep 0.1; done; exit 7")
# the runtime names the session keyring it makes for a container after the container (crun:
# the id, runc: "_ses." and the id)
KEYRING = "grep -Eq ' keyring +(_ses\\.)?{cid}: ' /proc/keys && echo own keyring || echo no keyring of its own"


def test_containers_the_kuasar_way(kuasar_agent, host, empty_dir, busybox_rootfs, tmp_path):
    agent, share = kuasar_agent
    data = tmp_path / "data"
    data.mkdir()
    (data / "host.txt").write_text("from the host\n")
    host.write_sandbox_files("kuasar-pod", "nameserver 192.0.2.53\n")
    subprocess.run(["nsenter", "-t", str(agent.pid), "-n", "ip", "link", "add", "eth0",
                    "address", MAC, "type", "veth", "peer", "name", "peer0"], check=True)
    first, second = (f"k{uuid.uuid4().hex[:12]}" for _ in range(2))
    mounts = [volume("/cache", empty_dir), volume("/data", data, "ro")]
    specs = {}
    for cid, script in ((first, INIT.format(keyring=KEYRING.format(cid=first))),
                        (second, "until [ -e /cache/x ]; do sleep 0.05; done; cat /cache/x; "
                                 + KEYRING.format(cid=second))):
        args = ["sh", "-c", script]
        specs[cid] = oci_spec(args, cid)
        specs[cid]["mounts"] += mounts
    out = {name: tmp_path / f"{name}.sock" for name in ("first", "second", "exec")}
    rootfs = {cid: overlay_rootfs(busybox_rootfs, tmp_path / "snapshots" / cid)
              for cid in (first, second)}

    async def body(t):
        setup = sandbox_pb.SetupSandboxRequest(
            interfaces=[sandbox_pb.Interface(device="eth0", name="eth0", hwAddr=MAC, mtu=1500,
                                             IPAddresses=[sandbox_pb.IPAddress(
                                                 address="10.88.0.5", mask="32")])],
            routes=[sandbox_pb.Route(gateway="169.254.1.1", device="eth0", flags=4)])
        setup.config.type_url = "PodSandboxConfig"
        setup.config.value = json.dumps({"hostname": "kuasar-pod", "dns_config": {
            "servers": ["192.0.2.53"]}}).encode()
        await t.client.call(SANDBOX, "SetupSandbox", setup, empty_pb2.Empty, timeout=10)

        # the first container: created, started, its output; it waits for /cache/stop
        host.append_container(first, specs[first], rootfs[first], io={
            "stdin": "", "stdout": f"unix://{out['first']}", "stderr": "", "terminal": False})
        request = containerd_create(first, rootfs[first], oci_pb2.Options(no_new_keyring=True))
        await t.call("Create", request)
        reading = asyncio.ensure_future(read_all(out["first"]))
        await t.start(first)

        # the second shares the emptyDir: the agent's tmpfs is mounted once for both
        host.append_container(second, specs[second], rootfs[second], io={
            "stdin": "", "stdout": f"unix://{out['second']}", "stderr": "", "terminal": False})
        await t.call("Create", containerd_create(second, rootfs[second]))
        second_output = asyncio.ensure_future(read_all(out["second"]))
        await t.start(second)
        assert await t.wait(second) == 0
        assert await second_output == b"hi\nown keyring\n"

        # an exec, its stdio from its io file, not from the request
        host.add_exec_io(first, "probe", {"stdin": "", "stdout": f"unix://{out['exec']}",
                                          "stderr": "", "terminal": False})
        await t.exec(first, "probe", ["sh", "-c", "cat /cache/x; touch /cache/stop; exit 3"],
                     stdout=f"{CRI_FIFOS}/{first}/io/2/probe-stdout")
        assert not (share / first / f"io-{first}-probe").exists()  # read once, as Kuasar's
        exec_output = asyncio.ensure_future(read_all(out["exec"]))
        await t.start(first, "probe")
        assert await t.wait(first, "probe") == 3
        assert await exec_output == b"hi\n"
        await t.delete(first, "probe")
        assert await t.wait(first) == 7
        state = await t.state(first)
        assert state.bundle == str(share / first)

        tmpfs = next(s["mount_point"] for s in host.storages if s["driver"] == "ephemeral")
        assert mounted(tmpfs)
        deleted = await t.delete(first)
        assert deleted.exit_status == 7
        assert mounted(tmpfs)  # the second container still uses it
        await t.delete(second)
        assert not mounted(tmpfs) and not os.path.exists(tmpfs)
        return await reading

    output = agent.run(body).decode()
    host.remove_container(first)
    host.remove_container(second)
    lines = output.splitlines()
    assert lines[:2] == ["hostname=kuasar-pod", "from the host"], output
    assert lines[2].startswith("tmpfs /cache tmpfs ") and "size=16384k" in lines[2], output
    assert lines[3].startswith("overlay / overlay "), output  # the host's pre-mounted rootfs
    assert lines[4] == "no keyring of its own", output  # no_new_keyring of the runc Options
    routes = subprocess.run(["nsenter", "-t", str(agent.pid), "-n", "ip", "route"],
                            capture_output=True, text=True, check=True).stdout
    assert "default via 169.254.1.1 dev eth0 onlink" in routes


def test_bad_kuasar_files_are_invalid_arguments(kuasar_agent, host, busybox_rootfs, tmp_path):
    agent, share = kuasar_agent
    cases = {
        "port": ({"stdin": "", "stdout": "chardev7", "stderr": "", "terminal": False}, None,
                 "INVALID_ARGUMENT", "virtio-serial"),
        "scsi": (None, {"driver": "scsi", "source": "0:1", "fstype": "ext4"},
                 "FAILED_PRECONDITION", "SCSI"),
        "nfs": (None, {"driver": "nfs", "source": "server:/x", "fstype": "nfs"},
                "INVALID_ARGUMENT", "driver 'nfs' is not supported"),
        "relative": (None, {"driver": "ephemeral", "source": "tmpfs", "fstype": "tmpfs",
                            "mount_point": "relative/dir"}, "INVALID_ARGUMENT", "mount_point"),
    }

    async def body(t):
        for name, (io, storage, code, words) in cases.items():
            cid = f"bad-{name}-{uuid.uuid4().hex[:6]}"
            rootfs = overlay_rootfs(busybox_rootfs, tmp_path / cid)
            bundle = host.append_container(cid, oci_spec(["true"], cid), rootfs, io)
            if storage is not None:
                spec = json.loads((bundle / "config.json").read_text())
                storage = {"host_source": f"/dev/{name}", "type": "bind", "id": "storage99",
                           "mount_point": str(tmp_path / "guest" / name), "options": [],
                           **storage}
                spec["annotations"]["io.kuasar.storages"] = json.dumps([storage])
                (bundle / "config.json").write_text(json.dumps(spec))
            error = await t.error("Create", containerd_create(cid, rootfs))
            assert error.code.name == code and words in error.message, (name, error)
            assert (await t.error("State", pb.StateRequest(id=cid))).code.name == "NOT_FOUND"
            host.remove_container(cid)

    agent.run(body)
    assert not (tmp_path / "guest").exists() or not os.listdir(tmp_path / "guest")
