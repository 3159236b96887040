"""Pure units: vhost-user framing, vsock headers, guest memory bounds, split-ring walking."""

import mmap
import os
import struct
import time
import tracemalloc

import pytest

from host_sandboxer.vsock import vhost_user as vu
from host_sandboxer.vsock.guest_memory import GuestMemory, GuestMemoryError
from host_sandboxer.vsock.packet import HEADER, HEADER_SIZE, read_header, slice_views, write_header
from host_sandboxer.vsock.virtqueue import (VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
                                            Virtqueue, VirtqueueError)

DESC = struct.Struct("<QIHH")


def test_header_and_reply_bytes_match_the_spec():
    assert vu.encode(vu.GET_FEATURES) == bytes.fromhex("01000000" "01000000" "00000000")
    reply = vu.encode_reply(vu.GET_FEATURES, vu.U64.pack(0x140000000))
    assert reply[:12] == bytes.fromhex("01000000" "05000000" "08000000")
    assert reply[12:] == bytes.fromhex("0000004001000000")


def test_reader_reassembles_split_and_glued_messages_with_their_fds():
    stream = (vu.encode(vu.SET_FEATURES, vu.U64.pack(1)) + vu.encode(vu.SET_VRING_KICK, vu.U64.pack(1))
              + vu.encode(vu.SET_OWNER))
    reader = vu.MessageReader()
    first = reader.feed(stream[:5])
    assert first == []
    # SET_FEATURES's tail glued to SET_VRING_KICK, which carried fd 42 (the chunk's last bytes).
    msgs = reader.feed(stream[5:40], [42])
    assert [(m.request, m.fds) for m in msgs] == [(vu.SET_FEATURES, []), (vu.SET_VRING_KICK, [42])]
    assert msgs[0].unpack(vu.U64) == (1,)
    msgs = reader.feed(stream[40:])
    assert [(m.request, m.payload, m.fds) for m in msgs] == [(vu.SET_OWNER, b"", [])]


@pytest.mark.parametrize("header, why", [
    (vu.HEADER.pack(1, 0x0, 0), "version"),
    (vu.HEADER.pack(1, 0x3, 0), "version"),
    (vu.HEADER.pack(5, 0x1, 1 << 20), "refused"),
])
def test_reader_rejects_garbage_without_allocating(header, why):
    with pytest.raises(vu.ProtocolError, match=why):
        vu.MessageReader().feed(header)


def test_short_payloads_are_protocol_errors():
    msg = vu.Message(vu.SET_VRING_ADDR, 1, b"\0" * 8)
    with pytest.raises(vu.ProtocolError):
        msg.unpack(vu.VRING_ADDR)
    with pytest.raises(vu.ProtocolError):
        vu.decode_mem_table(vu.MEM_TABLE_HEADER.pack(9, 0) + bytes(9 * 32))
    with pytest.raises(vu.ProtocolError):
        vu.decode_mem_table(vu.MEM_TABLE_HEADER.pack(2, 0) + bytes(32))


def test_mem_table_round_trip():
    regions = [vu.MemoryRegionEntry(0, 0xA0000, 0x7F0000000000, 0),
               vu.MemoryRegionEntry(0xC0000, 0x1F40000, 0x7F00000C0000, 0xC0000)]
    assert vu.decode_mem_table(vu.encode_mem_table(regions)) == regions


def test_vsock_header_is_44_bytes_and_may_span_descriptors():
    fields = (2, 3, 1 << 30, 1024, 5, 1, 5, 0, 262144, 77)
    blob = HEADER.pack(*fields)
    assert HEADER_SIZE == 44 and len(blob) == 44
    assert read_header([memoryview(blob[:10]), memoryview(blob[10:] + b"payload")]) == fields
    bufs = [memoryview(bytearray(20)), memoryview(bytearray(30))]
    write_header(bufs, fields)
    assert bytes(bufs[0]) + bytes(bufs[1])[:24] == blob
    with pytest.raises(ValueError):
        read_header([memoryview(blob[:43])])
    with pytest.raises(ValueError):
        write_header([memoryview(bytearray(40))], fields)


def test_a_header_split_over_descriptors_copies_only_its_44_bytes():
    """A guest's short first descriptor over huge ones: reading the header must not copy the
    chain (it did: 17 descriptors of 64 MiB cost the backend 2.1 GiB)."""
    fields = (3, 2, 1024, 1 << 30, 0, 1, 5, 0, 262144, 0)
    blob = HEADER.pack(*fields)
    huge = memoryview(bytearray(8 << 20))
    huge[:34] = blob[10:]
    views = [memoryview(blob[:10])] + [huge] * 8          # what 64 MiB of descriptors look like
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        before = tracemalloc.get_traced_memory()[0]
        assert read_header(views) == fields
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < 4096, f"reading a header allocated {peak} bytes"


def test_slice_views_skips_header_and_limits():
    views = [memoryview(b"0123456789"), memoryview(b"abcdef")]
    assert [bytes(v) for v in slice_views(views, 4, 8)] == [b"456789", b"ab"]
    assert [bytes(v) for v in slice_views(views, 12, 100)] == [b"cdef"]
    assert slice_views(views, 16, 5) == []


@pytest.fixture
def memory():
    fd = os.memfd_create("ram")
    os.ftruncate(fd, 1 << 20)
    entries = [vu.MemoryRegionEntry(0, 0x40000, 0x10000000, 0),
               vu.MemoryRegionEntry(0x80000, 0x80000, 0x10080000, 0x80000)]
    mem = GuestMemory.map(entries, [fd, os.dup(fd)])
    yield mem
    mem.close()


def test_guest_memory_bounds(memory):
    memory.view(0x3FFF0, 0x10)[:] = b"x" * 16
    assert bytes(memory.view(0x3FFF0, 0x10)) == b"x" * 16
    for gpa, length in [(0x3FFF1, 0x10), (0x40000, 1), (0x7FFFF, 2), (0x100000, 1), (-1, 1),
                        (0x80000, 1 << 64), (1 << 64, 1)]:
        with pytest.raises(GuestMemoryError):
            memory.view(gpa, length)
    view, off = memory.locate_uva(0x10080010, 16)
    assert off == 0x10
    with pytest.raises(GuestMemoryError):
        memory.locate_uva(0x10040000, 1)


def test_mapping_a_region_beyond_the_file_fails_and_closes_fds():
    fd = os.memfd_create("small")
    os.ftruncate(fd, 4096)
    with pytest.raises(GuestMemoryError):
        GuestMemory.map([vu.MemoryRegionEntry(0, 1 << 20, 0, 0)], [fd])
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_read_only_region_is_left_unmapped_and_its_fd_closed(tmp_path):
    """The guest's root image on virtio-pmem: QEMU hands over a read-only fd (mapping it for
    writing would fail the whole table); addresses in it are outside what the device may use."""
    image = tmp_path / "rootfs.img"
    image.write_bytes(b"\0" * (1 << 20))
    ram = os.memfd_create("ram")
    os.ftruncate(ram, 1 << 20)
    readonly = os.open(image, os.O_RDONLY)
    mem = GuestMemory.map([vu.MemoryRegionEntry(0, 1 << 20, 0x10000000, 0),
                           vu.MemoryRegionEntry(1 << 32, 1 << 20, 0x20000000, 0)], [ram, readonly])
    try:
        assert len(mem.regions) == 1
        mem.view(0, 16)[:] = b"y" * 16
        with pytest.raises(GuestMemoryError):
            mem.view(1 << 32, 16)
        with pytest.raises(GuestMemoryError):
            mem.locate_uva(0x20000000, 16)
    finally:
        mem.close()
    with pytest.raises(OSError):
        os.fstat(readonly)


class Ring:
    """A queue of `num` entries at guest address 0 of `memory`, laid out by hand."""

    def __init__(self, memory, num=8, features=0):
        self.mem = memory.regions[0].view
        self.num = num
        self.q = Virtqueue(0)
        self.q.set_num(num)
        self.q.desc_uva, self.q.avail_uva, self.q.used_uva = 0x10000000, 0x10000000 + 16 * num, 0x10001000
        self.q.kick_fd, self.q.enabled = -1, True
        self.q.start(memory, features)
        self.avail = 0

    def desc(self, i, addr, length, flags, nxt=0):
        DESC.pack_into(self.mem, 16 * i, addr, length, flags, nxt)

    def offer(self, head):
        base = 16 * self.num
        struct.pack_into("<H", self.mem, base + 4 + 2 * (self.avail % self.num), head)
        self.avail += 1
        struct.pack_into("<H", self.mem, base + 2, self.avail & 0xFFFF)


def test_chain_with_scatter_gather_and_indirect_table(memory):
    r = Ring(memory, features=VIRTIO_RING_F_INDIRECT_DESC)
    r.desc(0, 0x2000, 44, 1, 1)
    r.desc(1, 0x3000, 100, 1, 2)
    r.desc(2, 0x4000, 200, 2)
    r.offer(0)
    chain = r.q.pop()
    assert chain.head == 0 and [len(v) for v in chain.readable] == [44, 100]
    assert [len(v) for v in chain.writable] == [200]
    DESC.pack_into(r.mem, 0x5000, 0x6000, 10, 1, 1)
    DESC.pack_into(r.mem, 0x5010, 0x7000, 20, 2, 0)
    r.desc(3, 0x5000, 32, 4)
    r.offer(3)
    chain = r.q.pop()
    assert [len(v) for v in chain.readable] == [10] and [len(v) for v in chain.writable] == [20]
    assert r.q.pop() is None


@pytest.mark.parametrize("setup, why", [
    (lambda r: (r.desc(0, 0x2000, 10, 1, 0), r.offer(0)), "loops"),
    (lambda r: (r.desc(0, 0x2000, 10, 1, 9), r.offer(0)), "next 9"),
    (lambda r: r.offer(8), "head 8"),
    (lambda r: (r.desc(0, 0x2000, 10, 3, 1), r.desc(1, 0x2000, 10, 0), r.offer(0)), "after a writable"),
    (lambda r: (r.desc(0, 0x5000, 32, 4), r.offer(0)), "indirect"),
    (lambda r: (r.desc(0, 0x40000, 10, 0), r.offer(0)), "outside guest RAM"),
    (lambda r: (setattr(r, "avail", 9), r.offer(0)), "ahead"),
])
def test_malformed_chains_raise(memory, setup, why):
    r = Ring(memory)    # no INDIRECT_DESC negotiated
    setup(r)
    with pytest.raises((VirtqueueError, GuestMemoryError), match=why):
        r.q.pop()


TABLE = 0x5000   # where these tests lay indirect tables


def indirect_chain(r: Ring, direct: int, entries: int, nested_at: int = -1) -> None:
    """Offers a chain of `direct` descriptors, then one pointing at a table of `entries`
    (the one at `nested_at` pointing at a table again)."""
    for i in range(direct):
        r.desc(i, 0x2000, 10, 1, i + 1)
    r.desc(direct, TABLE, 16 * entries, 4)
    for i in range(entries):
        flags = 4 if i == nested_at else 1 if i < entries - 1 else 0
        DESC.pack_into(r.mem, TABLE + 16 * i, TABLE if i == nested_at else 0x6000, 16 if i == nested_at else 10,
                       flags, i + 1)
    r.offer(0)


@pytest.mark.parametrize("direct, entries", [(0, 8), (3, 5)])
def test_a_chain_as_long_as_the_queue_is_walked(memory, direct, entries):
    r = Ring(memory, num=8, features=VIRTIO_RING_F_INDIRECT_DESC)
    indirect_chain(r, direct, entries)
    assert r.q.pop().descriptors() == 8


@pytest.mark.parametrize("direct, entries, nested_at, why", [
    (0, 9, -1, "indirect table of 144 bytes after 0 descriptor.s. exceeds the queue size 8"),
    (3, 6, -1, "indirect table of 96 bytes after 3 descriptor.s. exceeds the queue size 8"),
    (0, 2048, -1, "exceeds the queue size 8"),      # was walked: tables were capped at 32768, not at the queue
    (1, 4, 2, "indirect descriptor not allowed here"),
])
def test_a_chain_longer_than_the_queue_or_nesting_tables_is_malformed(memory, direct, entries, nested_at, why):
    """virtio 1.2 §2.7.5.3.1: no chain longer than the queue size, an indirect table's entries
    counted with the descriptors before it; no table inside a table."""
    r = Ring(memory, num=8, features=VIRTIO_RING_F_INDIRECT_DESC)
    indirect_chain(r, direct, entries, nested_at)
    with pytest.raises(VirtqueueError, match=why):
        r.q.pop()


def test_pop_many_stops_once_the_chains_hold_the_descriptors_asked_for(memory):
    r = Ring(memory, num=8)
    for head in (0, 3):                 # two chains of 3 descriptors, then two of 1
        r.desc(head, 0x2000, 10, 1, head + 1)
        r.desc(head + 1, 0x2000, 10, 1, head + 2)
        r.desc(head + 2, 0x2000, 10, 0)
        r.offer(head)
    for head in (6, 7):
        r.desc(head, 0x2000, 10, 0)
        r.offer(head)
    assert [c.head for c in r.q.pop_many(8, 4)] == [0, 3]
    assert [c.head for c in r.q.pop_many(8, 8)] == [6, 7]


def test_event_idx_notification_suppression(memory):
    r = Ring(memory, features=VIRTIO_RING_F_EVENT_IDX)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    r.q.call_fd = call
    used_event_off = 16 * r.num + 4 + 2 * r.num
    struct.pack_into("<H", r.mem, used_event_off, 1)      # "interrupt me once used idx passes 1"
    for head in range(3):
        r.desc(head, 0x2000, 8, 2)
        r.offer(head)
        r.q.push(r.q.pop().head, 8)
        r.q.publish()
    assert os.eventfd_read(call) == 1                      # only the publish that crossed 1
    r.q.arm()
    assert struct.unpack_from("<H", r.mem, 0x1000 + 4 + 8 * r.num)[0] == 3   # avail_event
    os.close(call)
    r.q.call_fd = None


def _publish_used(q, value):
    q.used_idx = value
    q.publish()


def _arm(q, value):
    q.last_avail = value
    q.arm()


@pytest.mark.parametrize("store, offset", [(_publish_used, 0x1000 + 2),           # used idx
                                           (_arm, 0x1000 + 4 + 8 * 8)])           # avail_event
def test_an_index_the_guest_reads_is_never_seen_half_written(memory, store, offset):
    """The guest reads these while we write them: struct.pack_into zero-fills before it stores,
    so a guest could read 0 and take stale used entries for new ones (a FakeGuest in another
    process did, and re-posted ~65,000 buffers). Another process watches them flip."""
    r = Ring(memory, features=VIRTIO_RING_F_EVENT_IDX)
    values = (0x0101, 0x0202)
    store(r.q, values[0])
    pid = os.fork()
    if pid == 0:
        seen, deadline = set(), time.monotonic() + 0.5
        while time.monotonic() < deadline:
            for _ in range(1000):
                seen.add(struct.unpack_from("<H", r.mem, offset)[0])
        os._exit(0 if seen <= set(values) else 1)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        for value in values * 500:
            store(r.q, value)
    assert os.waitstatus_to_exitcode(status) == 0, "the other process saw an index half written"


def test_rollback_returns_the_same_chain(memory):
    r = Ring(memory)
    r.desc(5, 0x2000, 8, 2)
    r.offer(5)
    assert r.q.pop().head == 5
    r.q.rollback()
    assert r.q.pop().head == 5
