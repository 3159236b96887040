"""Split virtqueue (virtio 1.x §2.7) over untrusted guest memory: device side.

The guest writes the descriptor table and the available ring; every index, address, length
and flag read from them is checked here, and any violation raises VirtqueueError (the device
then resets itself). A chain holds at most the queue size of descriptors, an indirect table's
included (virtio 1.2 §2.7.5.3.1), so walking one costs a bounded amount whatever the guest
wrote. Descriptor chains come back as lists of memoryviews into guest RAM, so data moves
between guest memory and host sockets without extra copies.
"""

import os
import struct

from .guest_memory import GuestMemory

DESC = struct.Struct("<QIHH")   # addr, len, flags, next
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")  # id, len

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1

VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29

MAX_QUEUE_SIZE = 32768


def store_u16(view, offset: int, value: int) -> None:
    """Writes a ring index the other side reads meanwhile with one 16-bit store.
    struct.pack_into zero-fills its bytes before it packs (CPython's s_pack_internal), so a
    reader could see 0 in between. Native order: hosts are little-endian, as virtio 1.x rings."""
    view[offset:offset + 2].cast("H")[0] = value


class VirtqueueError(Exception):
    """The guest's ring is malformed (bad index, address, length, flags or a loop)."""


class Chain:
    """One descriptor chain: `readable` (driver->device) then `writable` (device->driver) views,
    one per descriptor."""
    __slots__ = ("head", "readable", "writable")

    def __init__(self, head: int, readable: list, writable: list):
        self.head = head
        self.readable = readable
        self.writable = writable

    def descriptors(self) -> int:
        return len(self.readable) + len(self.writable)


class Virtqueue:
    """Configuration (from vhost-user messages) plus the ring walking of one queue."""

    def __init__(self, index: int):
        self.index = index
        self.num = 0
        self.desc_uva = self.avail_uva = self.used_uva = None
        self.last_avail = 0        # next avail ring slot to consume
        self.used_idx = 0          # next used ring slot to fill
        self.kick_fd = None
        self.call_fd = None
        self.err_fd = None
        self.enabled = False
        self.started = False
        self.event_idx = False
        self.indirect = False
        self._signalled_used = 0   # used_idx when the guest was last notified
        self._memory = None

    # -- configuration ------------------------------------------------------------------

    def set_num(self, num: int) -> None:
        if num == 0 or num > MAX_QUEUE_SIZE or num & (num - 1):
            raise VirtqueueError(f"queue {self.index}: size {num} is not a power of 2 <= {MAX_QUEUE_SIZE}")
        self.num = num

    def replace_fd(self, name: str, fd) -> None:
        """Installs a new kick/call/err eventfd (QEMU replaces them at any time); closes the old."""
        old = getattr(self, name)
        if old is not None and old != fd:
            try:
                os.close(old)
            except OSError:
                pass
        if fd is not None:
            os.set_blocking(fd, False)
        setattr(self, name, fd)

    def ready(self) -> bool:
        return bool(self.num and self.desc_uva is not None and self.kick_fd is not None and self.enabled)

    def start(self, memory: GuestMemory, features: int) -> None:
        """Binds the ring areas to guest memory; raises GuestMemoryError if they do not fit."""
        n = self.num
        self._memory = memory
        self.event_idx = bool(features & VIRTIO_RING_F_EVENT_IDX)
        self.indirect = bool(features & VIRTIO_RING_F_INDIRECT_DESC)
        self._desc, self._desc_off = memory.locate_uva(self.desc_uva, 16 * n)
        self._avail, self._avail_off = memory.locate_uva(self.avail_uva, 6 + 2 * n)
        self._used, self._used_off = memory.locate_uva(self.used_uva, 6 + 8 * n)
        self.used_idx = U16.unpack_from(self._used, self._used_off + 2)[0]
        self.last_avail = self.used_idx   # chains in flight in a previous run are gone (as in libvhost-user)
        self._signalled_used = self.used_idx
        self.started = True

    def stop(self) -> None:
        self.started = False
        self._memory = None
        self._desc = self._avail = self._used = None

    def close(self) -> None:
        self.stop()
        for name in ("kick_fd", "call_fd", "err_fd"):
            self.replace_fd(name, None)

    # -- ring access --------------------------------------------------------------------

    def avail_idx(self) -> int:
        return U16.unpack_from(self._avail, self._avail_off + 2)[0]

    def pop(self):
        """The next available chain, or None. Raises VirtqueueError/GuestMemoryError if malformed."""
        chains = self.pop_many(1, self.num)
        return chains[0] if chains else None

    def pop_many(self, limit: int, descriptors: int) -> list:
        """Up to `limit` available chains in ring order: fewer when the ring runs dry, or once
        those popped hold `descriptors` descriptors (the caller's budget)."""
        last, num = self.last_avail, self.num
        avail = U16.unpack_from(self._avail, self._avail_off + 2)[0]
        ready = (avail - last) & 0xFFFF
        if ready > num:
            raise VirtqueueError(f"queue {self.index}: avail idx {avail} is {ready} ahead of {last} "
                                 f"with {num} entries")
        ring, ring_off = self._avail, self._avail_off + 4
        table, table_off, view = self._desc, self._desc_off, self._memory.view
        chains = []
        for i in range(min(ready, limit)):
            if descriptors <= 0:
                break
            head = U16.unpack_from(ring, ring_off + 2 * ((last + i) % num))[0]
            self.last_avail = (last + i + 1) & 0xFFFF
            if head >= num:
                raise VirtqueueError(f"queue {self.index}: head {head} >= size {num}")
            addr, length, flags, _ = DESC.unpack_from(table, table_off + 16 * head)
            if flags & (DESC_F_NEXT | DESC_F_INDIRECT):
                chain = self._walk(head)
                descriptors -= chain.descriptors()
            else:                          # the common one-descriptor chains, without _walk
                segment = [view(addr, length)]
                chain = Chain(head, [], segment) if flags & DESC_F_WRITE else Chain(head, segment, [])
                descriptors -= 1
            chains.append(chain)
        return chains

    def rollback(self) -> None:
        """Un-pops the last chain (it was not used); it will be returned by the next pop()."""
        self.last_avail = (self.last_avail - 1) & 0xFFFF

    def _walk(self, head: int) -> Chain:
        """The chain from `head`: direct descriptors, maybe ending in one indirect table. Its
        data descriptors, those of the table included, number at most the queue size (the
        descriptor that points at the table carries no data and is not counted); more is a
        loop or an overlong chain."""
        memory, limit = self._memory, self.num
        table, base, size = self._desc, self._desc_off, limit
        readable, writable = [], []
        i, seen, indirect = head, 0, False
        while True:
            addr, length, flags, nxt = DESC.unpack_from(table, base + 16 * i)
            if flags & DESC_F_INDIRECT:
                if not self.indirect or indirect or flags & DESC_F_NEXT:
                    raise VirtqueueError(f"queue {self.index}: indirect descriptor not allowed here")
                if length == 0 or length % 16:
                    raise VirtqueueError(f"queue {self.index}: indirect table of {length} bytes "
                                         "is not a whole number of descriptors")
                if seen + length // 16 > limit:
                    raise VirtqueueError(f"queue {self.index}: indirect table of {length} bytes after "
                                         f"{seen} descriptor(s) exceeds the queue size {limit}")
                table = memory.view(addr, length)
                base, size, i, indirect = 0, length // 16, 0, True
                continue
            seen += 1
            if seen > limit:
                raise VirtqueueError(f"queue {self.index}: chain from {head} loops or exceeds {limit}")
            segment = memory.view(addr, length)
            if flags & DESC_F_WRITE:
                writable.append(segment)
            elif writable:
                raise VirtqueueError(f"queue {self.index}: readable descriptor after a writable one")
            else:
                readable.append(segment)
            if not flags & DESC_F_NEXT:
                return Chain(head, readable, writable)
            if nxt >= size:
                raise VirtqueueError(f"queue {self.index}: next {nxt} >= {size}")
            i = nxt

    def push(self, head: int, length: int) -> None:
        """Puts a finished chain on the used ring (visible to the guest after publish())."""
        self.push_many(((head, length),))

    def push_many(self, entries) -> None:
        """push() for each (head, length), in order."""
        used, base, num, idx = self._used, self._used_off + 4, self.num, self.used_idx
        for head, length in entries:
            USED_ELEM.pack_into(used, base + 8 * (idx % num), head, length)
            idx = (idx + 1) & 0xFFFF
        self.used_idx = idx

    def publish(self) -> None:
        """Makes pushed entries visible and notifies the guest when it asked to be."""
        new = self.used_idx
        old = self._signalled_used
        store_u16(self._used, self._used_off + 2, new)
        if new == old:
            return
        if self.event_idx:
            event = U16.unpack_from(self._avail, self._avail_off + 4 + 2 * self.num)[0]
            notify = (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF
        else:
            notify = not U16.unpack_from(self._avail, self._avail_off)[0] & AVAIL_F_NO_INTERRUPT
        self._signalled_used = new
        if notify and self.call_fd is not None:
            try:
                os.eventfd_write(self.call_fd, 1)
            except OSError:
                pass

    def arm(self) -> bool:
        """Asks for a kick at the next new buffer; True if buffers arrived meanwhile (poll again)."""
        if self.event_idx:
            store_u16(self._used, self._used_off + 4 + 8 * self.num, self.last_avail)
        return self.avail_idx() != self.last_avail
