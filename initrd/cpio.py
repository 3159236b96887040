"""Deterministic newc ("070701") cpio writer, the format the kernel unpacks as initramfs.

Entries are written sorted by path (a directory always precedes its contents), owned by 0:0, with
every mtime = SOURCE_DATE_EPOCH and inode numbers given by position: the same entries always give
the same bytes.
"""
from __future__ import annotations

import os
import stat
from typing import BinaryIO, Iterable

from initrd.tree import Entry

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
DEFAULT_EPOCH = 1_700_000_000  # fixed default: builds never depend on the clock


def source_date_epoch() -> int:
    return int(os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_EPOCH))


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _member(name: str, ino: int, mode: int, nlink: int, mtime: int, data: bytes,
            rdev: tuple[int, int]) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = MAGIC + b"".join(b"%08X" % f for f in fields)
    return header + encoded + _pad4(len(header) + len(encoded)) + data + _pad4(len(data))


def write_newc(entries: Iterable[Entry], out: BinaryIO, mtime: int | None = None) -> None:
    """Serialise `entries` (any order) as a newc archive ending with the trailer."""
    mtime = source_date_epoch() if mtime is None else mtime
    ordered = sorted(entries, key=lambda e: e.path.split("/"))
    for ino, entry in enumerate(ordered, start=1):
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        out.write(_member(entry.path, ino, entry.mode, nlink, mtime, entry.data, entry.rdev))
    out.write(_member(TRAILER, 0, 0, 1, 0, b"", (0, 0)))
