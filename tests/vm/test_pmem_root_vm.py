"""The guest booted from build/guest/rootfs.img on virtio-pmem (vm.image = "pmem"): the kernel
mounts it read-only with DAX as the root, the agent runs as PID 1 from it, a container runs, and
the hybrid vsock backend (whose memory table now also lists the image) carries the agent's ttrpc
and a container's stdout."""
import asyncio
import json
import re

from test_task_vm import TASK, create_task, make_bundle
from vmm_common.protos.containerd.task.v2 import shim_pb2 as pb

STDOUT_PORT = 40002


def root_mount(mountinfo: str) -> dict:
    """The "/" line of /proc/1/mountinfo: mount options, fstype, source, super options."""
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == "/":
            after = fields[fields.index("-") + 1:]
            return {"options": fields[5].split(","), "fstype": after[0], "source": after[1],
                    "super": after[2].split(",")}
    raise AssertionError(f"no root in mountinfo:\n{mountinfo}")


def test_the_agent_boots_from_the_dax_root_and_runs_a_container(vm_factory):
    vm = vm_factory(image="pmem")
    console = vm.console_text()
    assert "Run /init as init process" in console and "Kernel panic" not in console
    assert "DAX unsupported" not in console, console[-3000:]
    assert re.search(r"erofs: \(device pmem0\): mounted", console, re.IGNORECASE), console[-3000:]
    # A container in the guest's PID namespace reads PID 1's (the agent's) mounts, and tries to
    # write beside /init through /proc/1/root; its output streams back over hybrid vsock.
    script = ("cat /proc/1/mountinfo; echo --; "
              "if echo x > /proc/1/root/written 2>/dev/null; then echo WRITABLE; else echo REFUSED; fi")
    cid, bundle = make_bundle(vm.share_dir, ["sh", "-c", script])
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "pid"]
    (bundle / "config.json").write_text(json.dumps(spec))

    async def scenario():
        client = await vm.client()
        try:
            await create_task(client, cid, stdout=f"vsock://{STDOUT_PORT}")
            reader, writer = await vm.guest.open_connection(STDOUT_PORT)
            await client.call(TASK, "Start", pb.StartRequest(id=cid), pb.StartResponse, timeout=60)
            waited = await client.call(TASK, "Wait", pb.WaitRequest(id=cid), pb.WaitResponse,
                                       timeout=60)
            out = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            await client.call(TASK, "Delete", pb.DeleteRequest(id=cid), pb.DeleteResponse,
                              timeout=60)
            return waited.exit_status, out.decode()
        finally:
            await client.close()

    status, out = vm.run(scenario(), timeout=300)
    assert status == 0, out
    mountinfo, _, write = out.partition("--\n")
    root = root_mount(mountinfo)
    assert (root["fstype"], root["source"]) == ("erofs", "/dev/root"), root  # the kernel's name
    assert "ro" in root["options"] and "dax=always" in root["super"], root
    assert write.strip() == "REFUSED"
