"""Guest RAM shared by QEMU (memfd regions from SET_MEM_TABLE), with bounds-checked access.

Guest memory is untrusted: every address and length that came from the guest goes through
`view()` or `locate_uva()`, which refuse anything not wholly inside one mapped region.

Only writable regions are mapped: QEMU's table also lists what it maps from a read-only file
(the guest's root image on virtio-pmem, `memory-backend-file,readonly=on`), whose fd cannot be
mapped for writing and which holds no virtqueue or buffer of ours; an address in it is refused
like any other address outside guest RAM.
"""

import fcntl
import mmap
import os
from collections import namedtuple


class GuestMemoryError(Exception):
    """An address/length outside guest RAM (a malformed queue or a hostile guest)."""


# One mapped region: guest_phys_addr, size, userspace_addr, mapping (mmap.mmap), view (memoryview).
Region = namedtuple("Region", "guest_phys_addr size userspace_addr mapping view")


class GuestMemory:
    def __init__(self, regions: list):
        self.regions = regions

    @classmethod
    def map(cls, entries: list, fds: list) -> "GuestMemory":
        """Maps each region's fd at its mmap_offset. Closes the fds (the mappings keep the memory)."""
        if len(entries) != len(fds):
            raise GuestMemoryError(f"{len(entries)} regions but {len(fds)} fds")
        regions = []
        try:
            for entry, fd in zip(entries, fds):
                if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
                    continue
                if entry.memory_size <= 0 or entry.mmap_offset % mmap.ALLOCATIONGRANULARITY:
                    raise GuestMemoryError(f"region size {entry.memory_size:#x} / offset "
                                           f"{entry.mmap_offset:#x} cannot be mapped")
                try:
                    mapping = mmap.mmap(fd, entry.memory_size, flags=mmap.MAP_SHARED,
                                        prot=mmap.PROT_READ | mmap.PROT_WRITE,
                                        offset=entry.mmap_offset)
                except (OSError, ValueError, OverflowError) as e:
                    raise GuestMemoryError(f"mmap of region at {entry.guest_phys_addr:#x}: {e}") from e
                regions.append(Region(entry.guest_phys_addr, entry.memory_size,
                                      entry.userspace_addr, mapping, memoryview(mapping)))
        except GuestMemoryError:
            cls(regions).close()
            raise
        finally:
            for fd in fds:
                os.close(fd)
        return cls(regions)

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest-physical [gpa, gpa+length)."""
        for r in self.regions:
            off = gpa - r.guest_phys_addr
            if 0 <= off and off + length <= r.size:
                return r.view[off:off + length]
        raise GuestMemoryError(f"guest address {gpa:#x}+{length:#x} is outside guest RAM")

    def locate_uva(self, uva: int, length: int) -> tuple:
        """(region view, offset) of QEMU-virtual [uva, uva+length): how ring addresses arrive."""
        for r in self.regions:
            off = uva - r.userspace_addr
            if 0 <= off and off + length <= r.size:
                return r.view, off
        raise GuestMemoryError(f"ring address {uva:#x}+{length:#x} is outside guest RAM")

    def close(self) -> None:
        """Unmaps; a mapping still referenced by a live view is unmapped when that view dies."""
        for r in self.regions:
            try:
                r.view.release()
                r.mapping.close()
            except BufferError:
                pass
        self.regions = []
