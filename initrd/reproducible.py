"""`make reproducible-check` (in `make stress`, ~15 min on 2 cores): the guest image rebuilt from
nothing must be byte for byte the cached build/guest.

"From nothing": an empty cache directory for the kernel build, the Nuitka agent and the runtime's
Debian packages, with Nuitka's own cache there too and ccache off, so no earlier compile is
reused. The rebuild goes to build/guest-reproduced/; the sha256 of the kernel, the initrd and the
root image, and every file the manifest lists, are compared, and each difference is named.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHED = REPO / "build" / "guest"
REBUILT = REPO / "build" / "guest-reproduced"
# What the manifest hashes whole: the kernel (the ELF QEMU boots), the initrd and the pmem root
# image, the default root on q35.
IMAGE_PARTS = ("kernel", "initrd", "rootfs")


def differences(cached: dict, rebuilt: dict) -> list[str]:
    """What differs between two guest-image manifests, one line each."""
    found = [f"{part} sha256 {cached[part]['sha256']} cached, {rebuilt[part]['sha256']} rebuilt"
             for part in IMAGE_PARTS if cached[part]["sha256"] != rebuilt[part]["sha256"]]
    before = {entry["path"]: entry for entry in cached["files"]}
    after = {entry["path"]: entry for entry in rebuilt["files"]}
    for path in sorted(before.keys() | after.keys()):
        if path not in after:
            found.append(f"{path}: only in the cached image")
        elif path not in before:
            found.append(f"{path}: only in the rebuilt image")
        elif before[path] != after[path]:
            changed = sorted(key for key in before[path].keys() | after[path].keys()
                             if before[path].get(key) != after[path].get(key))
            found.append(f"{path}: {', '.join(changed)} differ")
    return found


def rebuild(cached: dict, empty_cache: Path) -> dict:
    """Build the image `cached` describes with `empty_cache` as the only cache; its manifest."""
    empty_cache = empty_cache.resolve()  # apt and Nuitka run elsewhere: an absolute path
    env = dict(os.environ, VMM_TASK_CACHE=str(empty_cache), NUITKA_CACHE_DIR=str(empty_cache / "nuitka"),
               CCACHE_DISABLE="1")
    subprocess.run([sys.executable, "-m", "initrd.guest_image", "--runtime", cached["runtime"],
                    "--debug", "1" if cached["debug"] else "0",
                    "--compression", cached["initrd"]["compression"],
                    "--out", str(REBUILT), "--cache", str(empty_cache)], cwd=REPO, env=env, check=True)
    return json.loads((REBUILT / "manifest.json").read_text())


def main() -> int:
    cached = json.loads((CACHED / "manifest.json").read_text())
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="reproducible-cache-", dir=REPO / "build") as empty:
        rebuilt = rebuild(cached, Path(empty))
    found = differences(cached, rebuilt)
    took = f"rebuilt from an empty cache in {time.monotonic() - started:.0f} s"
    if found:
        print(f"reproducible-check: FAILED, {took}; {REBUILT} differs from {CACHED}:",
              *found, sep="\n  ")
        return 1
    hashes = ", ".join(f"{part} {rebuilt[part]['sha256']}" for part in IMAGE_PARTS)
    print(f"reproducible-check: ok, {took}: {hashes}, {len(rebuilt['files'])} files, as in {CACHED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
