"""build/guest/manifest.json: what is in the image, where it came from, how long each stage took."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from initrd.tree import Tree


def file_list(tree: Tree) -> list[dict]:
    """Every initrd member: files with size and sha256, symlinks with their target."""
    listing = []
    for path in sorted(tree.entries):
        entry = tree.entries[path]
        item = {"path": "/" + path, "type": entry.kind, "mode": oct(entry.mode & 0o7777)}
        if entry.kind == "file":
            item.update(size=len(entry.data), sha256=hashlib.sha256(entry.data).hexdigest())
        elif entry.kind == "symlink":
            item["target"] = entry.data.decode()
        elif entry.kind == "chardev":
            item["rdev"] = list(entry.rdev)
        listing.append(item)
    return listing


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(path: Path, manifest: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(path)
