"""A hostile guest against the real vsock backend process: vsock/serve.py on its Reactor, started
as the daemon starts it (vmm/vsock_backend.py) and reached as QEMU reaches it, over each VM's
vhost-user unix socket with guest RAM in a memfd shared by SET_MEM_TABLE and vrings driven by
kick and call eventfds. FakeGuest (test_vhost_user_session.py) stands in for QEMU and the guest
driver: a real Linux guest never writes such rings.

One backend serves a guilty VM and a bystander. The backend must stay up and small, the
bystander must keep answering a host->guest CONNECT with bytes both ways, and the guilty VM
alone must be reported DEAD, to the daemon and so to its pod. Every wait is bounded and a
timeout fails the test as "did not answer", apart from an answer that is an error.
"""

import asyncio
import contextlib
import os
import signal
import socket
import tempfile
import time
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from host_sandboxer.config import Config, ContainmentConfig, VsockConfig
from host_sandboxer.sandbox import lifecycle
from host_sandboxer.sandbox.pod import UNKNOWN_EXIT_STATUS, Pod
from host_sandboxer.sandbox.podconfig import PodConfig
from host_sandboxer.sandbox.statedir import StateDir
from host_sandboxer.vmm.vm import GuestVm
from host_sandboxer.vmm.vsock_backend import BackendVsock, VsockBackend
from host_sandboxer.vsock import vhost_user as vu
from host_sandboxer.vsock.packet import (HEADER, HEADER_SIZE, HOST_CID, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
                                         TYPE_STREAM)
from host_sandboxer.vsock.virtqueue import VIRTIO_RING_F_INDIRECT_DESC
from test_vhost_user_session import DESC, INDIRECT, MEM_SIZE, NEXT, TX_BUF_GPA, FakeGuest, run_async

MiB = 1 << 20
ANSWER_S = 5.0              # the longest any answer may take here (they take milliseconds)
MEMORY_BOUND_MIB = 64       # the backend's peak RSS (idle: ~12 MiB)
GUEST_PORT = 1024
TX = 1
OP, SRC_PORT = 6, 2         # header fields
BIG_GPA, BIG_LEN = 16 * MiB, 64 * MiB   # what the huge descriptors claim, inside the guilty VM's RAM
TABLE_GPA = 0x800000        # where indirect tables are laid


async def bounded(awaitable, what: str, timeout: float = ANSWER_S):
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError:
        pytest.fail(f"no answer within {timeout:g} s: {what}")


async def eventually(predicate, what: str, timeout: float = ANSWER_S):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"no answer within {timeout:g} s: {what}")
        await asyncio.sleep(0.001)


def backend_memory(pid: int) -> dict:
    """MiB: Rss and Anonymous now (smaps_rollup), and the peak RSS (VmHWM)."""
    found = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("Rss", "Anonymous"):
                found[name] = int(rest.split()[0]) / 1024
    with open(f"/proc/{pid}/status") as f:
        found["VmHWM"] = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    return found


class Qemu:
    """QEMU's side of one VM's vhost-user socket, with its guest driver (FakeGuest)."""

    def __init__(self, guest: FakeGuest, cid: int):
        self.guest, self.cid = guest, cid

    @classmethod
    async def connect(cls, vm: BackendVsock, mem_size: int = MEM_SIZE, indirect: bool = False) -> "Qemu":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(vm.vhost_socket))
        guest = FakeGuest(sock, mem_size=mem_size)
        try:
            seen = await guest.connect()
            if indirect:
                guest.features |= VIRTIO_RING_F_INDIRECT_DESC
            await guest.start_driver()
            await guest.request(vu.GET_FEATURES, reply=True)   # answered after the rings started
        except BaseException:
            guest.close()
            raise
        guest.post_rx()
        return cls(guest, seen["cid"])

    async def packet(self, op: int) -> tuple:
        """The next packet with `op` the device put in the guest's rx buffers (others are dropped)."""
        found = []
        await eventually(lambda: found or found.extend(p for p in self.guest.received() if p[0][OP] == op),
                         f"op {op} into the guest")
        return found[0]

    async def hangup(self) -> bytes:
        """What QEMU reads next on its vhost-user socket (b"": the backend closed it)."""
        return await bounded(asyncio.get_running_loop().sock_recv(self.guest.sock, 1), "vhost-user hangup")


class Node:
    """The daemon's backend process and, per VM directory, its transport and the QEMU connected."""

    def __init__(self, root: Path):
        self.root = root
        self.backend = VsockBackend(root, user=ContainmentConfig().backend_uid)  # as the daemon runs it
        self.vms: dict[str, BackendVsock] = {}
        self.qemus: list[Qemu] = []

    async def add(self, name: str, vm_dir: Path | None = None) -> BackendVsock:
        vm_dir = vm_dir or self.root / name
        vm_dir.mkdir(exist_ok=True)
        vm = self.vms[name] = BackendVsock(self.backend, vm_dir)
        await vm.start()
        return vm

    async def qemu(self, name: str, **options) -> Qemu:
        self.qemus.append(await Qemu.connect(self.vms[name], **options))
        return self.qemus[-1]

    async def close(self) -> None:
        for qemu in self.qemus:
            qemu.guest.close()
        for vm in self.vms.values():
            await vm.close()
        proc = self.backend.proc
        if proc is not None and proc.returncode is None:   # a failed test
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()


@contextlib.asynccontextmanager
async def served(*names):
    """A Node serving a VM directory per name."""
    with tempfile.TemporaryDirectory(prefix="vh-") as tmp:   # short: unix socket paths
        node = Node(Path(tmp))
        try:
            for name in names:
                await node.add(name)
            yield node
        finally:
            await node.close()


async def exchange(vm: BackendVsock, qemu: Qemu) -> float:
    """A host->guest CONNECT through the daemon's transport and 4 bytes each way; seconds taken.
    A refusal would be an answer (ConnectionRefusedError, an error here); silence fails."""
    began = time.monotonic()
    g = qemu.guest

    async def guest():
        request, _ = await qemu.packet(OP_REQUEST)
        g.send(GUEST_PORT, request[SRC_PORT], OP_RESPONSE, src_cid=qemu.cid)
        _, data = await qemu.packet(OP_RW)
        g.send(GUEST_PORT, request[SRC_PORT], OP_RW, data[::-1], src_cid=qemu.cid)
        g.send(GUEST_PORT, request[SRC_PORT], OP_RST, src_cid=qemu.cid)

    async def host():
        reader, writer = await vm.open_connection(GUEST_PORT)
        try:
            writer.write(b"ping")
            return await reader.readexactly(4)
        finally:
            writer.close()

    answer, _ = await bounded(asyncio.gather(host(), guest()), "CONNECT and bytes through the bystander")
    assert answer == b"gnip"
    return time.monotonic() - began


def huge_chain(g: FakeGuest) -> None:
    """A 10-byte first descriptor over 17 of 64 MiB (before: 2.1 GiB copied to read its header)."""
    g.set_desc(TX, 0, TX_BUF_GPA, 10, NEXT, 1)
    for i in range(1, 18):
        g.set_desc(TX, i, BIG_GPA, BIG_LEN, NEXT if i < 17 else 0, i + 1)
    g.make_avail(TX, 0)


class Flood:
    """Keeps the guilty guest's tx ring full: even heads carry a REQUEST to a port nobody serves
    (a dial, and an RST waiting for rx buffers this guest never gives back: the control queue
    fills to its cap), odd heads an indirect table as long as the queue."""

    def __init__(self, qemu: Qemu):
        g = self.guest = qemu.guest
        self.consumed = 0
        for i in range(g.num):
            DESC.pack_into(g.mem, TABLE_GPA + 16 * i, TX_BUF_GPA, HEADER_SIZE if i == 0 else 1,
                           NEXT if i < g.num - 1 else 0, i + 1)
        for head in range(g.num):
            header = TX_BUF_GPA + HEADER_SIZE * head
            g.mem[header:header + HEADER_SIZE] = HEADER.pack(qemu.cid, HOST_CID, 5000 + head, 7000, 0,
                                                             TYPE_STREAM, OP_REQUEST, 0, 262144, 0)
            if head % 2:
                g.set_desc(TX, head, TABLE_GPA, 16 * g.num, INDIRECT)
            else:
                g.set_desc(TX, head, header, HEADER_SIZE, 0)
            g.make_avail(TX, head)
        g.notify(TX)

    async def run(self, stop: asyncio.Event) -> None:
        g = self.guest
        while not stop.is_set():
            used = g.used(TX)
            for head, _ in used:
                g.make_avail(TX, head)
            if used:
                self.consumed += len(used)
                g.notify(TX)
            await asyncio.sleep(0.001)


@run_async
async def test_hostile_chains_leave_the_backend_up_small_and_the_other_vm_served():
    async with served("guilty", "bystander") as node:
        backend, vms = node.backend, node.vms
        pid = backend.proc.pid
        bystander = await node.qemu("bystander")
        quiet = sorted([await exchange(vms["bystander"], bystander) for _ in range(20)])
        guilty = await node.qemu("guilty", mem_size=BIG_GPA + BIG_LEN, indirect=True)
        idle = backend_memory(pid)

        huge_chain(guilty.guest)
        began = time.monotonic()
        guilty.guest.notify(TX)
        await eventually(lambda: guilty.guest.used(TX), "the huge chain consumed")
        huge_s = time.monotonic() - began
        after_huge = backend_memory(pid)

        flood, stop = Flood(guilty), asyncio.Event()
        flooding = asyncio.ensure_future(flood.run(stop))
        try:
            latencies = [await exchange(vms["bystander"], bystander) for _ in range(20)]
        finally:
            stop.set()
            await flooding
        flooded = backend_memory(pid)
        print(f"\nbackend MiB idle {idle}, after the 17 x 64 MiB chain ({huge_s * 1000:.1f} ms) {after_huge}, "
              f"after the flood ({flood.consumed} chains) {flooded}; bystander exchange median/max, quiet: "
              f"{quiet[10] * 1000:.1f}/{quiet[-1] * 1000:.1f} ms, during the flood: "
              f"{sorted(latencies)[10] * 1000:.1f}/{max(latencies) * 1000:.1f} ms")
        assert flood.consumed > 1000, "the flood hardly ran"
        assert backend.proc.returncode is None
        assert flooded["VmHWM"] < MEMORY_BOUND_MIB, flooded
        for vm in vms.values():      # no malformed ring here
            assert not vm.dead.done(), f"{vm.vm_dir.name}: {vm.dead.result()}"


def _loop(g: FakeGuest) -> None:
    g.set_desc(TX, 0, TX_BUF_GPA, HEADER_SIZE, NEXT, 1)
    g.set_desc(TX, 1, TX_BUF_GPA, HEADER_SIZE, NEXT, 0)


def _table(g: FakeGuest, entries: int, nested: bool = False) -> None:
    for i in range(entries):
        DESC.pack_into(g.mem, TABLE_GPA + 16 * i, TABLE_GPA if nested and i == 1 else TX_BUF_GPA, 16,
                       (INDIRECT if nested and i == 1 else 0) | (NEXT if i < entries - 1 else 0), i + 1)
    g.set_desc(TX, 0, TABLE_GPA, 16 * entries, INDIRECT)


MALFORMED = {
    "loop": (_loop, "loops"),
    "overlong-chain": (lambda g: _table(g, 32768), "exceeds the queue size 128"),
    "outside-ram": (lambda g: g.set_desc(TX, 0, g.mem_size + 4096, HEADER_SIZE, 0), "outside guest RAM"),
    "indirect-in-indirect": (lambda g: _table(g, 4, nested=True), "indirect descriptor not allowed here"),
}


@pytest.mark.parametrize("kind", MALFORMED)
@run_async
async def test_a_malformed_ring_ends_only_the_guilty_vm(kind):
    write, why = MALFORMED[kind]
    async with served("guilty", "bystander") as node:
        backend, vms = node.backend, node.vms
        bystander = await node.qemu("bystander")
        guilty = await node.qemu("guilty", indirect=True)
        write(guilty.guest)
        guilty.guest.make_avail(TX, 0)
        guilty.guest.notify(TX)
        reason = await bounded(vms["guilty"].dead, "the guilty VM's DEAD notice")
        assert "device reset by a malformed ring" in reason and why in reason, reason
        assert await guilty.hangup() == b"", "its QEMU sees the link end"
        assert backend.proc.returncode is None
        assert await backend._request("LIST") == f"OK {vms['bystander'].vm_dir}"
        await exchange(vms["bystander"], bystander)
        assert not vms["bystander"].dead.done()


class QemuProcess:
    """What lifecycle._watch_vm and GuestVm.close use of a pod's QEMU. It stands in for one
    because these VMs' guest is FakeGuest: a real QEMU's Linux guest never writes a bad ring."""

    def __init__(self):
        self.exited = asyncio.get_running_loop().create_future()

    def failure(self, what: str) -> str:
        return what

    async def close(self) -> None:
        if not self.exited.done():
            self.exited.set_result(-signal.SIGKILL)


@run_async
async def test_a_vm_reported_dead_ends_only_its_pod():
    """The daemon learns of a dead device from the backend's WATCH connection (a DEAD line,
    vmm/vsock_backend.py): the pod's VM is stopped and the pod ends as after a VMM death."""
    async with served() as node:
        state = StateDir(node.root / "pods")
        pods, watches = {}, []
        try:
            for name in ("guilty", "bystander"):
                state.create_sandbox_dir(name)
                pod = pods[name] = Pod(name, state, "k8s.io", PodConfig(), any_pb2.Any(), publisher=None)
                pod.state = "ready"
                pod.vm = GuestVm(Config(vsock=VsockConfig(transport="hybrid")), pod.dir,
                                 vsock_backend=node.backend)
                pod.vm.transport = await node.add(name, pod.dir)
                pod.vm.qemu = QemuProcess()
                watches.append(asyncio.ensure_future(lifecycle._watch_vm(pod)))
            guilty, other = pods["guilty"], pods["bystander"]
            bad = await node.qemu("guilty")
            good = await node.qemu("bystander")
            _loop(bad.guest)
            bad.guest.make_avail(TX, 0)
            bad.guest.notify(TX)
            await bounded(watches[0], "the guilty pod's end", lifecycle.VMM_EXIT_GRACE_S + ANSWER_S)
            assert (guilty.state, guilty.vm_exited.result()) == ("stopped", UNKNOWN_EXIT_STATUS)
            assert "vsock link is gone" in guilty.exit_reason and "loops" in guilty.exit_reason, guilty.exit_reason
            assert guilty.vm.qemu.exited.done(), "the unreachable VM is stopped"
            assert not watches[1].done() and not other.vm_exited.done()
            await exchange(other.vm.transport, good)
        finally:
            for watch in watches:
                watch.cancel()
            for pod in pods.values():
                await pod.vm.close()
