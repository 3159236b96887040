"""virtio-vsock packets, credit and the hybrid socket semantics, end to end through HybridVsock:
a FakeGuest (QEMU's front-end + a guest driver, see test_vhost_user_session.py) on the vhost-user
socket, real unix-socket clients and listeners on the host side."""

import asyncio
import os
import socket

import pytest

from host_sandboxer.vsock import vhost_user as vu
from host_sandboxer.vsock.connection import BUF_ALLOC, ESTABLISHED, Connection, CreditViolation
from host_sandboxer.vsock.device import BATCH_DESCRIPTORS, TX
from host_sandboxer.vsock.hybrid import HybridVsock
from host_sandboxer.vsock.packet import (HEADER, HEADER_SIZE, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE,
                                         OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_BOTH,
                                         SHUTDOWN_SEND, TYPE_STREAM)
from host_sandboxer.vsock.virtqueue import VIRTIO_RING_F_INDIRECT_DESC
from test_vhost_user_session import (DESC, EVENT_IDX, GUEST_CID, INDIRECT, NEXT, TX_BUF_GPA, WRITE, FakeGuest,
                                     run_async, until)

GUEST_PORT = 1024
SRC_CID, DST_CID, SRC_PORT, DST_PORT, LEN, TYPE, OP, FLAGS, BUF, FWD = range(10)


async def closed_by_peer(reader) -> bool:
    """True when the peer closed without sending anything (unread input turns EOF into a reset)."""
    try:
        return await reader.read() == b""
    except ConnectionResetError:
        return True


class Hybrid:
    """A started HybridVsock with a FakeGuest as its QEMU and guest driver."""

    def __init__(self, tmp_path):
        self.vsock = HybridVsock(tmp_path / "vhost.sock", tmp_path / "v.sock", GUEST_CID)
        self.inbox = []

    async def start(self, driver: bool = True, features_mask: int = ~0, indirect: bool = False):
        await self.vsock.start()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.vsock.vhost_socket)
        self.guest = FakeGuest(sock)
        await self.guest.connect(features_mask)
        if indirect:
            self.guest.features |= VIRTIO_RING_F_INDIRECT_DESC
        if driver:
            await self.guest.start_driver()
            await until(lambda: self.vsock.device.running, what="device start")
            self.guest.post_rx()
        return self

    async def expect(self, op: int, timeout: float = 5.0) -> tuple:
        """The next packet with `op` sent to the guest (earlier ones of other ops are kept)."""
        def found():
            self.inbox += self.guest.received()
            return any(p[0][OP] == op for p in self.inbox)
        await until(found, timeout, what=f"op {op}")
        i = next(i for i, p in enumerate(self.inbox) if p[0][OP] == op)
        return self.inbox.pop(i)

    async def host_connect(self, port: int = GUEST_PORT):
        """A host client's CONNECT; returns (reader, writer, REQUEST header seen by the guest)."""
        reader, writer = await asyncio.open_unix_connection(self.vsock.uds_path)
        writer.write(b"CONNECT %d\n" % port)
        request, _ = await self.expect(OP_REQUEST)
        return reader, writer, request

    async def established(self, buf_alloc: int = 262144):
        reader, writer, req = await self.host_connect()
        self.guest.send(GUEST_PORT, req[SRC_PORT], OP_RESPONSE, buf_alloc=buf_alloc)
        assert await reader.readline() == b"OK %d\n" % req[SRC_PORT]
        return reader, writer, req[SRC_PORT]

    async def close(self):
        await self.vsock.close()
        self.guest.close()


@run_async
async def test_host_connect_exchange_and_half_close(tmp_path):
    h = await Hybrid(tmp_path).start()
    reader, writer, req = await h.host_connect()
    assert (req[SRC_CID], req[DST_CID], req[DST_PORT]) == (2, GUEST_CID, GUEST_PORT)
    assert req[SRC_PORT] >= 1 << 30 and req[BUF] == BUF_ALLOC
    h.guest.send(GUEST_PORT, req[SRC_PORT], OP_RESPONSE)
    assert await reader.readline() == b"OK %d\n" % req[SRC_PORT]
    writer.write(b"ping")
    rw, payload = await h.expect(OP_RW)
    assert payload == b"ping" and rw[LEN] == 4
    h.guest.send(GUEST_PORT, req[SRC_PORT], OP_RW, b"pong")
    assert await reader.readexactly(4) == b"pong"
    writer.write_eof()
    shutdown, _ = await h.expect(OP_SHUTDOWN)
    assert shutdown[FLAGS] == SHUTDOWN_SEND
    h.guest.send(GUEST_PORT, req[SRC_PORT], OP_SHUTDOWN, flags=SHUTDOWN_BOTH)
    await h.expect(OP_RST)
    assert await reader.read() == b""
    assert not h.vsock.device.conns
    await h.close()


@run_async
async def test_guest_refusal_closes_the_client_and_open_connection_raises(tmp_path):
    h = await Hybrid(tmp_path).start()
    reader, writer, req = await h.host_connect()
    h.guest.send(GUEST_PORT, req[SRC_PORT], OP_RST)
    assert await reader.read() == b""
    task = asyncio.ensure_future(h.vsock.open_connection(GUEST_PORT))
    req, _ = await h.expect(OP_REQUEST)
    h.guest.send(GUEST_PORT, req[SRC_PORT], OP_RST)
    try:
        await task
        raise AssertionError("open_connection succeeded on a refused port")
    except ConnectionRefusedError as e:
        assert "refused" in str(e)
    await h.close()


@run_async
async def test_connect_before_the_driver_is_up_is_closed_and_bad_lines_are_dropped(tmp_path):
    h = await Hybrid(tmp_path).start(driver=False)
    reader, writer = await asyncio.open_unix_connection(h.vsock.uds_path)
    writer.write(b"CONNECT 1024\n")
    assert await reader.read() == b""
    for line in (b"HELLO 1\n", b"CONNECT 99999999999\n", b"CONNECT " + b"1" * 100):
        reader, writer = await asyncio.open_unix_connection(h.vsock.uds_path)
        writer.write(line)
        assert await asyncio.wait_for(closed_by_peer(reader), 6)
    await h.close()


@run_async
async def test_guest_connects_to_host_listener_or_gets_rst(tmp_path):
    h = await Hybrid(tmp_path).start()
    h.guest.send(5000, 1234, OP_REQUEST)
    rst, _ = await h.expect(OP_RST)
    assert (rst[SRC_PORT], rst[DST_PORT]) == (1234, 5000)
    accepted = asyncio.get_running_loop().create_future()
    server = await asyncio.start_unix_server(lambda r, w: accepted.set_result((r, w)),
                                             f"{h.vsock.uds_path}_1234")
    h.guest.send(5001, 1234, OP_REQUEST)
    resp, _ = await h.expect(OP_RESPONSE)
    assert (resp[SRC_PORT], resp[DST_PORT], resp[BUF]) == (1234, 5001, BUF_ALLOC)
    reader, writer = await asyncio.wait_for(accepted, 5)
    h.guest.send(5001, 1234, OP_RW, b"from guest")
    assert await reader.readexactly(10) == b"from guest"
    writer.write(b"from host")
    _, payload = await h.expect(OP_RW)
    assert payload == b"from host"
    writer.close()
    shutdown, _ = await h.expect(OP_SHUTDOWN)
    assert shutdown[FLAGS] == SHUTDOWN_SEND
    server.close()
    await h.close()


@run_async
async def test_host_to_guest_respects_guest_credit(tmp_path):
    h = await Hybrid(tmp_path).start()
    reader, writer, port = await h.established(buf_alloc=1000)
    writer.write(os.urandom(5000))
    got = b""
    while len(got) < 1000:
        got += (await h.expect(OP_RW))[1]
    await asyncio.sleep(0.05)
    h.inbox += h.guest.received()
    assert len(got) == 1000 and not [p for p in h.inbox if p[0][OP] == OP_RW], "sent beyond credit"
    h.guest.send(GUEST_PORT, port, OP_CREDIT_UPDATE, buf_alloc=1000, fwd_cnt=1000)
    while len(got) < 2000:
        got += (await h.expect(OP_RW))[1]
    assert len(got) == 2000
    await h.close()


@run_async
async def test_guest_to_host_credit_updates_buffering_and_overrun(tmp_path):
    h = await Hybrid(tmp_path).start()
    reader, writer, port = await h.established()
    chunk = os.urandom(65536)
    h.guest.send(GUEST_PORT, port, OP_RW, chunk)
    update, _ = await h.expect(OP_CREDIT_UPDATE)
    assert update[FWD] == 65536 and update[BUF] == BUF_ALLOC
    assert await reader.readexactly(65536) == chunk
    h.guest.send(GUEST_PORT, port, OP_CREDIT_REQUEST)
    update, _ = await h.expect(OP_CREDIT_UPDATE)
    assert update[FWD] == 65536
    # The host stops reading: the socket buffer fills, then our BUF_ALLOC; one more chunk is an overrun.
    sent = 0
    while not any(p[0][OP] == OP_RST for p in h.inbox) and sent < 200:
        h.guest.send(GUEST_PORT, port, OP_RW, chunk)
        sent += 1
        await until(lambda: h.guest.used(1), what="tx used")
        h.inbox += h.guest.received()
    rst, _ = await h.expect(OP_RST)
    assert sent < 200 and rst[DST_PORT] == GUEST_PORT
    await h.close()


def test_a_write_beyond_the_credit_is_refused_before_it_is_copied():
    """The stream's buffer never holds more than the BUF_ALLOC granted, whatever the guest sends."""
    ours, host = socket.socketpair()
    ours.setblocking(False)
    conn = Connection(ours, GUEST_CID, GUEST_PORT, 5000, ESTABLISHED)
    chunk = memoryview(bytes(60000))
    with pytest.raises(CreditViolation):
        for _ in range(1000):             # the host never reads: the socket fills, then the buffer
            conn.write([chunk])
            assert len(conn.pending) <= BUF_ALLOC
    assert len(conn.pending) <= BUF_ALLOC
    conn.close()
    host.close()


@run_async
async def test_an_rw_moves_its_declared_length_whatever_its_descriptors_claim(tmp_path):
    h = await Hybrid(tmp_path).start()
    reader, writer, port = await h.established()
    g, big = h.guest, 0x800000
    g.mem[TX_BUF_GPA:TX_BUF_GPA + HEADER_SIZE] = HEADER.pack(GUEST_CID, HOST_CID, GUEST_PORT, port, 100,
                                                             TYPE_STREAM, OP_RW, 0, 262144, 0)
    g.mem[big:big + 101] = b"x" * 100 + b"!"
    g.set_desc(TX, 0, TX_BUF_GPA, HEADER_SIZE, NEXT, 1)
    g.set_desc(TX, 1, big, 4 << 20, NEXT, 2)         # 8 MiB of descriptors behind 100 bytes
    g.set_desc(TX, 2, big, 4 << 20, 0)
    g.make_avail(TX, 0)
    g.notify(TX)
    assert await asyncio.wait_for(reader.readexactly(100), 5) == b"x" * 100
    g.send(GUEST_PORT, port, OP_RW, b"next")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"next"
    await h.close()


def long_chains(guest: FakeGuest, q: int, heads, table: int, data: int, entry: int, flags: int) -> None:
    """Makes each of `heads` on queue `q` one indirect table as long as the queue (all the same
    table): entries of `entry` bytes from `data` on, with `flags`."""
    for i in range(guest.num):
        DESC.pack_into(guest.mem, table + 16 * i, data + entry * i, entry,
                       flags | (NEXT if i < guest.num - 1 else 0), i + 1)
    for head in heads:
        guest.set_desc(q, head, table, 16 * guest.num, INDIRECT)


def descriptors_per_callback(device, queue) -> dict:
    """Spies on `queue`'s pops: descriptors walked in each device callback (each has its own Budget)."""
    walked = {}
    pop_many = queue.pop_many

    def spy(limit, descriptors):
        chains = pop_many(limit, descriptors)
        walked[device.budget] = walked.get(device.budget, 0) + sum(c.descriptors() for c in chains)
        return chains
    queue.pop_many = spy
    return walked


@run_async
async def test_a_guest_flooding_long_chains_gets_a_budget_per_callback(tmp_path):
    """64 tx chains as long as the queue (128-entry indirect tables): one callback walks about
    BATCH_DESCRIPTORS descriptors and leaves the rest to later turns, in which another VM on
    the loop is answered (before: all 8192 descriptors in one callback)."""
    for name in "ab":
        (tmp_path / name).mkdir()
    bystander = await Hybrid(tmp_path / "b").start()
    h = await Hybrid(tmp_path / "a").start(indirect=True)
    g, device = h.guest, h.vsock.device
    g.mem[TX_BUF_GPA:TX_BUF_GPA + HEADER_SIZE] = HEADER.pack(GUEST_CID, HOST_CID, 1, 2, 0, TYPE_STREAM,
                                                             OP_RST, 0, 0, 0)   # of no stream: ignored
    long_chains(g, TX, range(64), TX_BUF_GPA + 0x1000, TX_BUF_GPA, HEADER_SIZE, 0)
    for head in range(64):
        g.make_avail(TX, head)
    device.kick(TX)                   # one callback, as the loop runs it on the guest's kick
    walked = device.txq.last_avail * g.num
    assert 0 < walked <= BATCH_DESCRIPTORS + g.num, f"one callback walked {walked} descriptors"
    bystander.guest.send(1000, 9999, OP_REQUEST)      # nothing listens there: RST back
    await bystander.expect(OP_RST)
    assert device.txq.last_avail < 64, "the other VM was answered only after the whole flood"
    await until(lambda: device.txq.last_avail == 64, what="the rest of the flood")
    assert len(g.used(TX)) == 64 and device.running
    await h.close()
    await bystander.close()


@run_async
async def test_host_data_into_long_rx_chains_moves_a_budget_per_callback(tmp_path):
    """rx buffers as long as the queue: each callback walks about BATCH_DESCRIPTORS descriptors
    and the data goes on over later turns (before: 4 bursts of 16 such chains a callback, and a
    recvmsg into 2048 buffers, beyond IOV_MAX, reset the stream)."""
    h = await Hybrid(tmp_path).start(indirect=True)
    reader, writer, port = await h.established()
    g, device = h.guest, h.vsock.device
    walked = descriptors_per_callback(device, device.rxq)
    long_chains(g, 0, range(g.num), 0x300000, 0x310000, 64, WRITE)   # every rx buffer, posted or not
    writer.write(bytes(BUF_ALLOC))                   # all the guest's credit
    got = 0

    def delivered():
        nonlocal got
        for head, length in g.used(0):
            got += length - HEADER_SIZE
            g.make_avail(0, head)
        g.notify(0)
        return got >= BUF_ALLOC
    await until(delivered, what="the guest's whole credit")
    assert max(walked.values()) <= BATCH_DESCRIPTORS + g.num, sorted(walked.values())
    assert device.conns, "the stream is still up"
    await h.close()


@run_async
async def test_bad_packets_are_answered_with_rst_or_dropped(tmp_path):
    h = await Hybrid(tmp_path).start()
    h.guest.send(6000, 7000, OP_RW, b"x")                  # no such connection
    rst, _ = await h.expect(OP_RST)
    assert (rst[SRC_PORT], rst[DST_PORT]) == (7000, 6000)
    h.guest.send(6000, 7000, OP_RST)                      # an RST is never answered
    h.guest.send(6001, 7000, OP_REQUEST, src_cid=99)      # spoofed source CID: dropped
    h.guest.send(6002, 7000, OP_REQUEST, kind=2)          # SEQPACKET is not offered
    rst, _ = await h.expect(OP_RST)
    assert rst[DST_PORT] == 6002
    reader, writer, port = await h.established()
    h.guest.send(GUEST_PORT, port, OP_RW, b"abc", length=60000)   # claims more than it carries
    rst, _ = await h.expect(OP_RST)
    assert rst[SRC_PORT] == port
    assert await reader.read() == b""
    await asyncio.sleep(0.05)
    h.inbox += h.guest.received()
    assert not h.inbox, f"unexpected packets {h.inbox}"
    await h.close()


@run_async
async def test_data_after_guest_shutdown_resets_and_guest_close_flushes(tmp_path):
    h = await Hybrid(tmp_path).start()
    reader, writer, port = await h.established()
    h.guest.send(GUEST_PORT, port, OP_RW, b"last words")
    h.guest.send(GUEST_PORT, port, OP_SHUTDOWN, flags=SHUTDOWN_BOTH)
    await h.expect(OP_RST)
    assert await reader.read() == b"last words"
    reader, writer, port = await h.established()
    h.guest.send(GUEST_PORT, port, OP_SHUTDOWN, flags=SHUTDOWN_SEND)
    assert await reader.read() == b""           # half-close reaches the host as EOF
    h.guest.send(GUEST_PORT, port, OP_RW, b"too late")
    await h.expect(OP_RST)
    await h.close()


@run_async
async def test_control_packets_wait_for_rx_buffers_in_order(tmp_path):
    h = Hybrid(tmp_path)
    await h.vsock.start()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(h.vsock.vhost_socket)
    h.guest = FakeGuest(sock)
    await h.guest.connect()
    await h.guest.start_driver()
    await until(lambda: h.vsock.device.running)
    server = await asyncio.start_unix_server(lambda r, w: w.write(b"hello"), f"{h.vsock.uds_path}_80")
    h.guest.send(4000, 80, OP_REQUEST)         # no rx buffers posted yet
    h.guest.send(4001, 81, OP_REQUEST)         # nobody on 81
    await until(lambda: len(h.guest.used(1)) or len(h.vsock.device.control) == 2)
    await asyncio.sleep(0.05)
    h.guest.post_rx()
    await until(lambda: len(h.inbox) >= 3 or h.inbox.extend(h.guest.received()))
    ops = [(p[0][DST_PORT], p[0][OP]) for p in h.inbox[:3]]
    assert ops == [(4000, OP_RESPONSE), (4001, OP_RST), (4000, OP_RW)]
    assert h.inbox[2][1] == b"hello"
    server.close()
    await h.close()


@run_async
async def test_device_stop_drops_host_connections_and_qemu_exit_resolves_dead(tmp_path):
    h = await Hybrid(tmp_path).start()
    reader, writer, port = await h.established()
    await h.guest.stop_driver()
    assert await reader.read() == b""
    assert not h.vsock.dead.done()
    h.guest.sock.close()
    reason = await asyncio.wait_for(h.vsock.dead, 5)
    assert "closed" in reason
    await h.vsock.close()
    h.guest.close()


@run_async
async def test_split_connect_line_and_pipelined_bytes(tmp_path):
    h = await Hybrid(tmp_path).start()
    reader, writer = await asyncio.open_unix_connection(h.vsock.uds_path)
    writer.write(b"CONN")
    await writer.drain()
    await asyncio.sleep(0.02)
    writer.write(b"ECT 1024\nearly bytes")
    req, _ = await h.expect(OP_REQUEST)
    h.guest.send(GUEST_PORT, req[SRC_PORT], OP_RESPONSE)
    assert await reader.readline() == b"OK %d\n" % req[SRC_PORT]
    _, payload = await h.expect(OP_RW)
    assert payload == b"early bytes"
    await h.close()


@run_async
async def test_without_event_idx_every_used_buffer_is_signalled(tmp_path):
    h = await Hybrid(tmp_path).start(features_mask=~EVENT_IDX)
    assert not h.vsock.backend.queues[0].event_idx
    reader, writer, port = await h.established()
    writer.write(b"a" * 10000)
    got = b""
    while len(got) < 10000:
        got += (await h.expect(OP_RW))[1]
    assert os.eventfd_read(h.guest.call[0]) >= 1     # rx interrupts
    h.guest.send(GUEST_PORT, port, OP_RW, b"b" * 3000)
    assert await reader.readexactly(3000) == b"b" * 3000
    assert os.eventfd_read(h.guest.call[1]) >= 1     # tx completions
    await h.close()


@run_async
async def test_malformed_ring_resets_the_device_and_resolves_dead(tmp_path):
    h = await Hybrid(tmp_path).start()
    reader, writer, port = await h.established()
    h.guest.make_avail(1, 9999)          # a head beyond the ring
    h.guest.notify(1)
    reason = await asyncio.wait_for(h.vsock.dead, 5)
    assert "malformed ring" in reason and "head 9999" in reason
    assert await closed_by_peer(reader)
    assert h.vsock.backend.closed is False, "the vhost-user session itself stays up"
    await h.close()


@run_async
async def test_kick_and_call_fds_replaced_while_running_keep_streams(tmp_path):
    h = await Hybrid(tmp_path).start(features_mask=~EVENT_IDX)   # every completion is signalled
    reader, writer, port = await h.established()
    g = h.guest
    for q in range(2):
        os.close(g.kick[q])
        g.kick[q] = os.eventfd(0, os.EFD_NONBLOCK)
        await g.request(vu.SET_VRING_KICK, vu.U64.pack(q), [g.kick[q]])
    await g.set_call_fds()
    await g.request(vu.GET_FEATURES, reply=True)    # a barrier: the back-end has seen the new fds
    assert h.vsock.device.running and h.vsock.device.conns
    g.send(GUEST_PORT, port, OP_RW, b"via the new kick fd")
    assert await reader.readexactly(19) == b"via the new kick fd"
    assert os.eventfd_read(g.call[1]) >= 1, "tx completion signalled on the new call fd"
    await h.close()
