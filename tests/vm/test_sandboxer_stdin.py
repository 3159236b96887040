"""100 MiB into a container's stdin through the whole stack (issue 8): a containerd-like FIFO on
the host -> vmm-sandboxer's task server -> hybrid vsock -> the agent -> crun -> the container,
driven as the CRI does (Controller.Create/Start, Task.Create with FIFOs, Start, the FIFO written
and closed, CloseIO, Wait).  The container hashes and counts what it read; the host compares.
(test_stdio_integrity_vm.py sends 64 MiB to the agent directly, without the daemon.)
"""
import hashlib
import os
import random
import threading
import time

import pytest

from scripts import demo
from vmm_common.protos.containerd.task.v3 import shim_pb2 as task

pytestmark = [pytest.mark.vm, pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")]
NS = demo.NAMESPACE
SIZE = 100 << 20
# dd counts what it copies from stdin in whole 64 KiB blocks (on stderr: "FULL+PARTIAL records
# in"; busybox's dd prints no byte count), sha256sum hashes it (stdout).  One copy more than
# sha256sum alone: tee into `wc -c` costs twice that under TCG.
BLOCK = 64 << 10
HASH_AND_COUNT = f"dd bs={BLOCK} iflag=fullblock | sha256sum"


def write_and_close(path: str, payload: bytes) -> None:
    """Write `payload` into the FIFO and close it, as containerd's stdin copier does."""
    with open(path, "wb") as fifo:
        fifo.write(payload)


def test_100_mib_into_stdin_through_the_daemon_arrives_intact(harness):
    payload = random.Random(8).randbytes(SIZE)
    started = harness.cri.run_pod("stdin-pod", timeout=180)
    tasks = demo.Cri.task_client(started.address)
    bundle = harness.bundle(started, "hasher", ["sh", "-c", HASH_AND_COUNT])
    stdin, stdout, stderr = bundle.fifo("stdin"), bundle.fifo("stdout"), bundle.fifo("stderr")
    out, err = demo.FifoReader(stdout), demo.FifoReader(stderr)
    tasks.Create(task.CreateTaskRequest(id=bundle.id, bundle=str(bundle.path), rootfs=bundle.rootfs,
                                        stdin=stdin, stdout=stdout, stderr=stderr), metadata=NS, timeout=60)
    tasks.Start(task.StartRequest(id=bundle.id), metadata=NS, timeout=60)
    began = time.monotonic()
    writer = threading.Thread(target=write_and_close, args=(stdin, payload), daemon=True)
    writer.start()
    writer.join(300)
    assert not writer.is_alive(), "the stack stopped taking stdin"
    seconds = time.monotonic() - began
    tasks.CloseIO(task.CloseIORequest(id=bundle.id, stdin=True), metadata=NS, timeout=60)
    status = tasks.Wait(task.WaitRequest(id=bundle.id), metadata=NS, timeout=300).exit_status
    digest, dd_summary = out.result(), err.result()
    print(f"\n{SIZE >> 20} MiB written into the stdin FIFO in {seconds:.1f} s ({SIZE / seconds / 1e6:.0f} MB/s)")
    assert status == 0, (digest, dd_summary)
    assert dd_summary.decode().startswith(f"{SIZE // BLOCK}+0 records in\n"), dd_summary  # SIZE bytes exactly
    assert digest == f"{hashlib.sha256(payload).hexdigest()}  -\n".encode()
    tasks.Delete(task.DeleteRequest(id=bundle.id), metadata=NS, timeout=60)
    tasks.Shutdown(task.ShutdownRequest(id=bundle.id), metadata=NS, timeout=60)
    harness.cri.remove_pod("stdin-pod")
    harness.assert_nothing_left()
