"""The uid a pod's QEMU runs as: one of its own from the configured range, with the same gid.

One per pod, not one for all: processes of one uid may signal and ptrace each other and read
each other's /proc/PID/mem, so a QEMU a guest took over would reach every other guest's memory.
Kata's rootless mode likewise makes a user per sandbox (`CreateVmmUser`, useradd); here the ids
need no /etc/passwd entry (setpriv takes numbers), and QEMU needs no file of its own: every
socket it uses is handed to it open (vmm/qemu_fds.py).
"""
from __future__ import annotations

UID_MAX = 2**32 - 2  # (uid_t)-1 means "unchanged" to setresuid


class UidRangeError(ValueError):
    pass


class UidRange:
    def __init__(self, base: int, count: int):
        if base <= 0 or base + count - 1 > UID_MAX:
            raise UidRangeError(f"vmm uid range [{base}, {base + count}) must lie within [1, {UID_MAX}]")
        self.base = base
        self.count = count

    def __contains__(self, uid: int) -> bool:
        return self.base <= uid < self.base + self.count

    def pick(self, taken: set[int]) -> int:
        """The lowest uid of the range not in `taken` (the uids of the daemon's pods)."""
        for uid in range(self.base, self.base + self.count):
            if uid not in taken:
                return uid
        raise UidRangeError(f"all {self.count} uids from {self.base} are taken by pods "
                            "(containment.vmm_uids)")
