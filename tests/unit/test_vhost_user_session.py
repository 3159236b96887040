"""The vhost-user back-end driven the way QEMU 7.2 drives it (HYBRID-VSOCK-NOTES.md), over a
socketpair, with a memfd as guest RAM and split rings laid out in it by a fake guest driver.

`FakeGuest` (QEMU's front-end + a Linux virtio-vsock driver, in the test process) is also used
by test_vsock_device.py and test_vsock_fuzz.py. No QEMU here: tests/vm/ runs the real one.
"""

import asyncio
import functools
import mmap
import os
import socket
import struct

from host_sandboxer.vsock import vhost_user as vu
from host_sandboxer.vsock.backend import FEATURES, VhostUserBackend
from host_sandboxer.vsock.device import VsockDevice
from host_sandboxer.vsock.packet import HEADER, HEADER_SIZE, HOST_CID, TYPE_STREAM
from host_sandboxer.vsock.virtqueue import store_u16

GUEST_CID = 7
MEM_SIZE = 16 << 20
HOLE = (0xA0000, 0xC0000)           # QEMU's two regions of one memfd, as on q35
UVA_BASE = 0x7F12_0000_0000          # what QEMU's mappings would be at in its address space
RING_GPA = (0x100000, 0x110000)      # rx, tx
RX_BUF_GPA, RX_BUF_SIZE = 0x200000, 4096
TX_BUF_GPA, TX_SLOT = 0x400000, 0x11000
DESC = struct.Struct("<QIHH")
NEXT, WRITE, INDIRECT = 1, 2, 4
VERSION_1, EVENT_IDX = 1 << 32, 1 << 29


def uva(gpa: int) -> int:
    return UVA_BASE + gpa


class FakeGuest:
    """QEMU 7.2's vhost-user front-end plus a minimal virtio-vsock driver, over guest RAM in a memfd."""

    def __init__(self, sock: socket.socket, num: int = 128, mem_size: int = MEM_SIZE):
        self.sock = sock
        sock.setblocking(False)
        self.memfd = os.memfd_create("guest-ram")
        os.ftruncate(self.memfd, mem_size)
        self.mem = mmap.mmap(self.memfd, mem_size)
        self.mem_size = mem_size
        self.num = num
        self.kick = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self.call = [None, None]
        self.avail = [0, 0]        # next avail idx per queue
        self.used_seen = [0, 0]    # used entries already consumed
        self.tx_next = 0           # tx slot round robin
        self.rx_payload = bytearray()

    # -- vhost-user front-end --------------------------------------------------------

    async def request(self, req: int, payload: bytes = b"", fds=(), need_reply=False, reply=False):
        flags = vu.FLAG_VERSION | (vu.FLAG_NEED_REPLY if need_reply else 0)
        vu.send_message(self.sock, vu.encode(req, payload, flags), list(fds))
        if not (reply or need_reply):
            return None
        return await asyncio.wait_for(self._reply(req), 5)

    async def _reply(self, req: int) -> bytes:
        loop = asyncio.get_running_loop()
        header = await loop.sock_recv(self.sock, vu.HEADER.size)
        assert len(header) == vu.HEADER.size, f"back-end hung up instead of answering request {req}"
        r_req, r_flags, size = vu.HEADER.unpack(header)
        assert (r_req, r_flags) == (req, vu.REPLY_FLAGS)
        body = b""
        while len(body) < size:
            chunk = await loop.sock_recv(self.sock, size - len(body))
            assert chunk, f"back-end hung up in its answer to request {req}"
            body += chunk
        return body

    async def set_call_fds(self):
        for q in range(2):
            fd = os.eventfd(0, os.EFD_NONBLOCK)
            await self.request(vu.SET_VRING_CALL, vu.U64.pack(q), [fd])
            if self.call[q] is not None:
                os.close(self.call[q])
            self.call[q] = fd

    async def connect(self, features_mask: int = ~0) -> dict:
        """QEMU 7.2 at startup; returns what the back-end answered."""
        seen = {}
        seen["features"] = vu.U64.unpack(await self.request(vu.GET_FEATURES, reply=True))[0]
        seen["protocol"] = vu.U64.unpack(await self.request(vu.GET_PROTOCOL_FEATURES, reply=True))[0]
        await self.request(vu.SET_PROTOCOL_FEATURES, vu.U64.pack(seen["protocol"]))
        await self.request(vu.SET_OWNER)
        await self.request(vu.GET_FEATURES, reply=True)
        await self.set_call_fds()
        for q in range(2):
            err = os.eventfd(0)
            await self.request(vu.SET_VRING_ERR, vu.U64.pack(q), [err])
            os.close(err)
        config = await self.request(vu.GET_CONFIG, vu.CONFIG_HEADER.pack(0, 8, 0) + bytes(8), reply=True)
        seen["cid"] = struct.unpack_from("<Q", config, vu.CONFIG_HEADER.size)[0]
        self.features = seen["features"] & features_mask & ~(1 << 28)
        return seen

    async def start_driver(self):
        """What QEMU sends when the guest driver brings the device up."""
        await self.set_call_fds()
        await self.request(vu.SET_FEATURES, vu.U64.pack(self.features))
        assert await self.set_mem_table() == 0
        await self.configure_rings()
        for q in range(2):
            await self.request(vu.SET_VRING_ENABLE, vu.VRING_STATE.pack(q, 1))
        await self.set_call_fds()

    async def set_mem_table(self) -> int:
        """QEMU's two regions of one memfd (around the PC hole); returns the REPLY_ACK status."""
        regions = [vu.MemoryRegionEntry(0, HOLE[0], uva(0), 0),
                   vu.MemoryRegionEntry(HOLE[1], self.mem_size - HOLE[1], uva(HOLE[1]), HOLE[1])]
        ack = await self.request(vu.SET_MEM_TABLE, vu.encode_mem_table(regions),
                                 [self.memfd, self.memfd], need_reply=True)
        return vu.U64.unpack(ack)[0]

    async def configure_rings(self):
        """Fresh zeroed rings: NUM, BASE, ADDR, KICK per queue (not yet enabled)."""
        self.avail, self.used_seen, self.tx_next = [0, 0], [0, 0], 0
        for q in range(2):
            self.mem[RING_GPA[q]:RING_GPA[q] + 0x10000] = bytes(0x10000)
            desc, avail, used = self.ring(q)
            await self.request(vu.SET_VRING_NUM, vu.VRING_STATE.pack(q, self.num))
            await self.request(vu.SET_VRING_BASE, vu.VRING_STATE.pack(q, 0))
            await self.request(vu.SET_VRING_ADDR, vu.VRING_ADDR.pack(q, 0, uva(desc), uva(used), uva(avail), 0))
            await self.request(vu.SET_VRING_KICK, vu.U64.pack(q), [self.kick[q]])

    async def stop_driver(self) -> list:
        """Device stop / guest reset; returns the ring bases the back-end reported."""
        for q in range(2):
            await self.request(vu.SET_VRING_ENABLE, vu.VRING_STATE.pack(q, 0))
        bases = [vu.VRING_STATE.unpack(await self.request(vu.GET_VRING_BASE, vu.VRING_STATE.pack(q, 0),
                                                          reply=True))[1] for q in range(2)]
        await self.set_call_fds()
        return bases

    def close(self):
        self.sock.close()
        self.mem.close()
        for fd in [self.memfd, *self.kick, *[c for c in self.call if c is not None]]:
            os.close(fd)

    # -- guest driver -----------------------------------------------------------------

    def ring(self, q: int) -> tuple:
        desc = RING_GPA[q]
        avail = desc + 16 * self.num
        used = (avail + 6 + 2 * self.num + 4095) & ~4095
        return desc, avail, used

    def set_desc(self, q: int, i: int, addr: int, length: int, flags: int, nxt: int = 0):
        DESC.pack_into(self.mem, self.ring(q)[0] + 16 * i, addr, length, flags, nxt)

    def make_avail(self, q: int, head: int):
        _, avail, _ = self.ring(q)
        struct.pack_into("<H", self.mem, avail + 4 + 2 * (self.avail[q] % self.num), head)
        self.avail[q] = (self.avail[q] + 1) & 0xFFFF
        store_u16(memoryview(self.mem), avail + 2, self.avail[q])   # the backend may read it meanwhile

    def notify(self, q: int):
        os.eventfd_write(self.kick[q], 1)

    def post_rx(self, count: int = None, size: int = RX_BUF_SIZE):
        for i in range(self.num if count is None else count):
            self.set_desc(0, i, RX_BUF_GPA + i * RX_BUF_SIZE, size, WRITE)
            self.make_avail(0, i)
        self.notify(0)

    def used(self, q: int) -> list:
        """New used entries (id, len) since the last call."""
        _, _, used = self.ring(q)
        idx = struct.unpack_from("<H", self.mem, used + 2)[0]
        out = []
        while self.used_seen[q] != idx:
            out.append(struct.unpack_from("<II", self.mem, used + 4 + 8 * (self.used_seen[q] % self.num)))
            self.used_seen[q] = (self.used_seen[q] + 1) & 0xFFFF
        return out

    def send(self, src_port: int, dst_port: int, op: int, payload: bytes = b"", flags: int = 0,
             buf_alloc: int = 262144, fwd_cnt: int = 0, src_cid: int = GUEST_CID, dst_cid: int = HOST_CID,
             kind: int = TYPE_STREAM, length: int = None, kick: bool = True):
        """Puts one packet (header descriptor + data descriptor, like Linux 6.1) on the tx ring."""
        slot = self.tx_next % (self.num // 2)
        self.tx_next += 1
        base = TX_BUF_GPA + slot * TX_SLOT
        hdr = HEADER.pack(src_cid, dst_cid, src_port, dst_port, len(payload) if length is None else length,
                          kind, op, flags, buf_alloc, fwd_cnt)
        self.mem[base:base + HEADER_SIZE] = hdr
        self.mem[base + 256:base + 256 + len(payload)] = payload
        if payload:
            self.set_desc(1, 2 * slot, base, HEADER_SIZE, NEXT, 2 * slot + 1)
            self.set_desc(1, 2 * slot + 1, base + 256, len(payload), 0)
        else:
            self.set_desc(1, 2 * slot, base, HEADER_SIZE, 0)
        self.make_avail(1, 2 * slot)
        if kick:
            self.notify(1)

    def received(self) -> list:
        """Packets the device put in rx buffers since the last call (buffers are re-posted)."""
        out = []
        for head, length in self.used(0):
            base = RX_BUF_GPA + head * RX_BUF_SIZE
            fields = HEADER.unpack_from(self.mem, base)
            out.append((fields, bytes(self.mem[base + HEADER_SIZE:base + length])))
            self.make_avail(0, head)
        if out:
            self.notify(0)
        return out


def run_async(test):
    """Runs an async test in its own event loop (no pytest asyncio plugin in this project)."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return wrapper


async def until(predicate, timeout: float = 5.0, what: str = "condition"):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


class Session:
    """A back-end on one end of a socketpair and a FakeGuest on the other."""

    def __init__(self, dial=lambda port: None, num: int = 128):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.closed_reason = None
        self.device = VsockDevice(GUEST_CID, dial, asyncio.get_running_loop())
        self.backend = VhostUserBackend(ours, self.device, on_close=self._closed)
        self.guest = FakeGuest(theirs, num)

    def _closed(self, reason):
        self.closed_reason = reason

    async def start(self, features_mask: int = ~0):
        await self.guest.connect(features_mask)
        await self.guest.start_driver()
        await until(lambda: self.device.running, what="device start")
        self.guest.post_rx()
        return self

    def close(self):
        self.backend.close("test over")
        self.guest.close()


# -- tests of the state machine ---------------------------------------------------------

@run_async
async def test_qemu_startup_sequence_negotiates_and_reports_cid():
    s = Session()
    seen = await s.guest.connect()
    assert seen["features"] == FEATURES
    assert seen["features"] & (1 << 30) and seen["features"] & VERSION_1
    assert seen["protocol"] & vu.PROTOCOL_F_CONFIG and seen["protocol"] & vu.PROTOCOL_F_REPLY_ACK
    assert seen["cid"] == GUEST_CID
    assert not s.device.running
    s.close()


@run_async
async def test_rings_start_only_after_enable_and_stop_on_get_vring_base():
    s = Session()
    await s.guest.connect()
    g = s.guest
    await g.set_call_fds()
    await g.request(vu.SET_FEATURES, vu.U64.pack(g.features))
    # Without SET_VRING_ENABLE the rings must stay stopped (protocol features are on).
    assert await g.set_mem_table() == 0
    await g.configure_rings()
    await asyncio.sleep(0.01)
    assert not s.device.running
    for q in range(2):
        await g.request(vu.SET_VRING_ENABLE, vu.VRING_STATE.pack(q, 1))
    await until(lambda: s.device.running)
    g.post_rx(4)
    g.send(1000, 9999, 1)     # REQUEST to a port nobody serves: one tx chain in, one RST out
    await until(lambda: g.used(1), what="tx used")
    assert [p[0][6] for p in g.received()] == [3]
    assert await g.stop_driver() == [1, 1]
    assert not s.device.running
    s.close()


@run_async
async def test_restart_after_guest_reset_uses_new_rings():
    s = await Session().start()
    await s.guest.stop_driver()
    assert not s.device.running
    await s.guest.start_driver()
    await until(lambda: s.device.running, what="restart")
    s.guest.post_rx()
    s.guest.send(1000, 9999, 1)   # REQUEST to a port nobody serves -> RST
    await until(lambda: any(p[0][6] == 3 for p in s.guest.received()), what="RST after restart")
    s.close()


@run_async
async def test_need_reply_is_acked_and_unknown_request_fails():
    s = Session()
    await s.guest.connect()
    ack = await s.guest.request(vu.SET_OWNER, need_reply=True)
    assert vu.U64.unpack(ack)[0] == 0
    ack = await s.guest.request(99, need_reply=True)
    assert vu.U64.unpack(ack)[0] != 0
    ack = await s.guest.request(vu.SET_VRING_NUM, vu.VRING_STATE.pack(0, 100), need_reply=True)
    assert vu.U64.unpack(ack)[0] != 0, "a queue size that is not a power of 2 must be refused"
    ack = await s.guest.request(vu.SET_VRING_NUM, vu.VRING_STATE.pack(5, 128), need_reply=True)
    assert vu.U64.unpack(ack)[0] != 0, "queue 5 does not exist"
    s.close()


@run_async
async def test_mem_table_out_of_file_is_refused_and_ring_outside_memory_does_not_start():
    s = Session()
    await s.guest.connect()
    g = s.guest
    await g.request(vu.SET_FEATURES, vu.U64.pack(g.features))
    too_big = [vu.MemoryRegionEntry(0, MEM_SIZE * 2, uva(0), 0)]
    ack = await g.request(vu.SET_MEM_TABLE, vu.encode_mem_table(too_big), [g.memfd], need_reply=True)
    assert vu.U64.unpack(ack)[0] != 0
    await g.start_driver()   # a good table, but now point the tx ring far outside it
    await until(lambda: s.device.running)
    await g.stop_driver()
    await g.request(vu.SET_VRING_ADDR, vu.VRING_ADDR.pack(1, 0, uva(MEM_SIZE), uva(MEM_SIZE), uva(MEM_SIZE), 0))
    await g.request(vu.SET_VRING_KICK, vu.U64.pack(1), [g.kick[1]])
    await g.request(vu.SET_VRING_KICK, vu.U64.pack(0), [g.kick[0]])
    ack = await g.request(vu.SET_VRING_ENABLE, vu.VRING_STATE.pack(1, 1), need_reply=True)
    ack = await g.request(vu.SET_VRING_ENABLE, vu.VRING_STATE.pack(0, 1), need_reply=True)
    assert vu.U64.unpack(ack)[0] != 0
    assert not s.device.running and s.closed_reason is None
    s.close()


@run_async
async def test_garbage_from_front_end_ends_only_that_session():
    s = Session()
    other = await Session().start()
    s.guest.sock.send(vu.HEADER.pack(1, 0x7, 0))     # version bits 3: not vhost-user
    await until(lambda: s.closed_reason is not None, what="session end")
    assert "protocol error" in s.closed_reason
    assert other.device.running and other.closed_reason is None
    other.close()
    s.guest.close()


@run_async
async def test_front_end_hangup_releases_everything():
    s = await Session().start()
    s.guest.sock.close()
    await until(lambda: s.closed_reason is not None)
    assert not s.device.running
    assert all(q.kick_fd is None and q.call_fd is None for q in s.backend.queues)
    assert s.backend.memory is None



@run_async
async def test_config_read_of_absurd_size_ends_the_session_without_allocating_it():
    s = Session()
    await s.guest.connect()
    vu.send_message(s.guest.sock, vu.encode(vu.GET_CONFIG, vu.CONFIG_HEADER.pack(0, 0xFFFFFFF0, 0)))
    await until(lambda: s.closed_reason is not None)
    assert "GET_CONFIG" in s.closed_reason
    s.guest.close()
