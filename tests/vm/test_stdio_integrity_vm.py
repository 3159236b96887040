"""64 MiB each way through the real agent's container stdio (issue 4's integrity check).

test_vsock_vm.py pushes 64 MiB through the hybrid vsock transport with a test-only echo guest;
this sends the same amount through the real image: the agent's `vsock://PORT` stdio listeners,
its pipe pumps and crun, into and out of a busybox container. Both sides hash what they saw.
"""
import asyncio
import hashlib
import random

import pytest
from google.protobuf import empty_pb2

from test_task_vm import GUEST_SHARE, TASK, make_bundle
from vmm_common.protos.containerd.task.v2 import shim_pb2 as pb

pytestmark = pytest.mark.vm
SIZE = 64 << 20
STDIN_PORT, STDOUT_PORT, STDERR_PORT = 40011, 40012, 40013
# The guest tees its random stream into sha256sum (through a FIFO on the /dev tmpfs) while
# writing it to stdout: the digest on stderr is of exactly the bytes it sent.
# `wait`: the shell is the container's init, so it must outlive the hasher.
GUEST_SOURCE = (f"busybox mkfifo /dev/tap && {{ busybox sha256sum < /dev/tap >&2 & }} && "
                f"busybox head -c {SIZE} /dev/urandom | busybox tee /dev/tap && wait $!")


async def run_with_stdio(vm, args: list[str], stdin: bytes | None) -> tuple[bytes, bytes, int]:
    """Create+Start a container with vsock stdio; feed `stdin` (then EOF); (stdout, stderr, exit)."""
    cid, _ = make_bundle(vm.share_dir, args)
    client = await vm.client()

    async def call(method, request, response=empty_pb2.Empty, timeout=60.0):
        return await client.call(TASK, method, request, response, timeout=timeout)

    async def feed(writer):
        writer.write(stdin)
        await writer.drain()
        writer.write_eof()

    try:
        await call("Create", pb.CreateTaskRequest(
            id=cid, bundle=f"{GUEST_SHARE}/{cid}", stdout=f"vsock://{STDOUT_PORT}",
            stderr=f"vsock://{STDERR_PORT}", stdin=f"vsock://{STDIN_PORT}" if stdin is not None else ""),
            pb.CreateTaskResponse)
        streams = [await vm.guest.open_connection(port) for port in (STDOUT_PORT, STDERR_PORT)]
        if stdin is not None:
            streams.append(await vm.guest.open_connection(STDIN_PORT))
        await call("Start", pb.StartRequest(id=cid), pb.StartResponse)
        jobs = [reader.read() for reader, _ in streams[:2]]
        if stdin is not None:
            jobs.append(feed(streams[2][1]))
        out, err, *_ = await asyncio.wait_for(asyncio.gather(*jobs), 120)
        waited = await call("Wait", pb.WaitRequest(id=cid), pb.WaitResponse, timeout=30)
        for _, writer in streams:
            writer.close()
        await call("Delete", pb.DeleteRequest(id=cid), pb.DeleteResponse)
        return out, err, waited.exit_status
    finally:
        await client.close()


def test_64_mib_into_a_container_stdin_arrives_intact(vm):
    payload = random.Random(4).randbytes(SIZE)
    out, err, status = vm.run(run_with_stdio(vm, ["busybox", "sha256sum"], payload), timeout=180)
    assert status == 0, err
    assert out.split()[0].decode() == hashlib.sha256(payload).hexdigest()


def test_64_mib_out_of_a_container_stdout_arrives_intact(vm):
    out, err, status = vm.run(run_with_stdio(vm, ["sh", "-c", GUEST_SOURCE], None), timeout=180)
    assert status == 0, err
    assert len(out) == SIZE
    assert hashlib.sha256(out).hexdigest() == err.split()[0].decode()
