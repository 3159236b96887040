"""Inside the guest, nothing but the host reaches the agent (QEMU TCG, hybrid vsock).

A process in the guest (here a static probe run with ExecVMProcess, as a container allowed
AF_VSOCK would run it) connects to the agent's port 1024 and to a container's stdio port, on the
loopback cid and on the guest's own cid: it is refused each time (no vsock loopback in the guest
kernel; the agent closes connections from any peer but the host), while the host's calls and
the stdio stream still work.
"""
import asyncio
import subprocess
from pathlib import Path

from google.protobuf import empty_pb2

from test_task_vm import GUEST_SHARE, TASK, create_task, make_bundle
from vmm_common.protos.containerd.task.v2 import shim_pb2 as pb
from vmm_common.protos.kuasar import sandbox_pb2 as sandbox_pb

PROBE_SOURCE = Path(__file__).resolve().parent / "vsock_probe.c"
STDOUT_PORT = 40003


def test_guest_processes_cannot_reach_the_agent_or_a_stdio_port(vm_factory, tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    subprocess.run(["gcc", "-static", "-O2", "-o", str(share / "vsock_probe"), str(PROBE_SOURCE)],
                   check=True)
    vm = vm_factory(kernel_params=["task.debug"], share_dir=share)
    cid, _ = make_bundle(share, ["sh", "-c", "echo the host still gets this"])

    async def scenario():
        client = await vm.client()
        try:
            await create_task(client, cid, stdout=f"vsock://{STDOUT_PORT}")
            probed = await client.call("grpc.SandboxService", "ExecVMProcess",
                                       sandbox_pb.ExecVMProcessRequest(
                                           command=f"{GUEST_SHARE}/vsock_probe 1024 {STDOUT_PORT}"),
                                       sandbox_pb.ExecVMProcessResponse, timeout=60)
            reader, writer = await vm.guest.open_connection(STDOUT_PORT)
            await client.call(TASK, "Start", pb.StartRequest(id=cid), pb.StartResponse, timeout=60)
            output = await asyncio.wait_for(reader.read(), 60)
            writer.close()
            await client.call(TASK, "Wait", pb.WaitRequest(id=cid), pb.WaitResponse, timeout=60)
            await client.call(TASK, "Delete", pb.DeleteRequest(id=cid), pb.DeleteResponse)
            await client.call("grpc.SandboxService", "Check", sandbox_pb.CheckRequest(),
                              empty_pb2.Empty, timeout=10)
            return probed.out, output
        finally:
            await client.close()

    probed, output = vm.run(scenario(), timeout=300)
    print(probed)  # -s: how each attempt was refused
    lines = probed.splitlines()
    assert len(lines) == 4, probed  # two ports, each on the loopback and the guest's own cid
    for line in lines:
        assert line.endswith(": closed") or ": connect failed: " in line, probed
    assert output == b"the host still gets this\n"
