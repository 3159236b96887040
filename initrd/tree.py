"""The initrd's file tree in memory: entries keyed by path, parents created on demand.

Every stage (userland, agent, /etc, device nodes) adds entries here; the cpio writer serialises
them in sorted order, so the image depends only on the entries, never on the host's directory
order, owners or timestamps.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    """One archive member. `path` is relative ('usr/bin/crun'); `data` is the file's contents or
    the symlink's target; `mode` includes the S_IF* type bits."""
    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    @property
    def kind(self) -> str:
        return {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
                stat.S_IFCHR: "chardev"}[stat.S_IFMT(self.mode)]


class Tree:
    """Initrd contents. Adding the same path twice with different contents is a build bug."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def add(self, entry: Entry) -> None:
        path = entry.path.strip("/")
        if not path:
            return
        parent = os.path.dirname(path)
        if parent and parent not in self.entries:
            self.directory(parent)
        existing = self.entries.get(path)
        entry = Entry(path, entry.mode, entry.data, entry.rdev)
        if existing is not None and existing != entry:
            raise ValueError(f"initrd: conflicting entries for /{path}")
        self.entries[path] = entry

    def directory(self, path: str, mode: int = 0o755) -> None:
        self.add(Entry(path, stat.S_IFDIR | mode))

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.add(Entry(path, stat.S_IFREG | mode, data))

    def symlink(self, path: str, target: str) -> None:
        self.add(Entry(path, stat.S_IFLNK | 0o777, target.encode()))

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.add(Entry(path, stat.S_IFCHR | mode, rdev=(major, minor)))

    def __contains__(self, path: str) -> bool:
        return path.strip("/") in self.entries

    def copy_host_path(self, host_path: str | Path, dest: str | None = None) -> None:
        """Copy a host file to `dest` (default: the same path), reproducing every symlink met on
        the way (e.g. /lib -> usr/lib, ld-linux symlinks) so the guest resolves it the same way."""
        host = Path(os.path.abspath(host_path))
        if dest is not None:
            self._copy_resolved(host.resolve(), dest.strip("/"))
            return
        so_far = Path("/")
        for part in host.parts[1:]:
            so_far = so_far / part
            if so_far.is_symlink():
                target = os.readlink(so_far)
                self.symlink(str(so_far), target)
                rest = host.relative_to(so_far)
                resolved = (so_far.parent / target / rest)
                self.copy_host_path(os.path.normpath(resolved))
                return
        self._copy_resolved(host, str(host).strip("/"))

    def _copy_resolved(self, host: Path, dest: str) -> None:
        st = host.stat()
        if stat.S_ISDIR(st.st_mode):
            self.directory(dest, stat.S_IMODE(st.st_mode))
        else:
            self.file(dest, host.read_bytes(), stat.S_IMODE(st.st_mode))

    def copy_host_dir(self, host_dir: Path, dest: str) -> None:
        """A host directory tree (files, dirs, relative symlinks) copied under `dest`."""
        for root, dirs, files in os.walk(host_dir):
            rel = os.path.relpath(root, host_dir)
            base = dest if rel == "." else f"{dest}/{rel}"
            self.directory(base, stat.S_IMODE(os.stat(root).st_mode))
            for name in dirs + files:
                src = Path(root, name)
                if src.is_symlink():
                    self.symlink(f"{base}/{name}", os.readlink(src))
                elif src.is_file():
                    self._copy_resolved(src, f"{base}/{name}")
