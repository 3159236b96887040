"""The pod PID namespace's init, rootfs-builder/pod-pause.c, compiled with the host's C compiler
(`make setup`'s build-essential) and cached in $VMM_TASK_CACHE/pod-pause/<key>/pod-pause, keyed
by the source, the flags and the compiler's version.

It links the build host's libc, which the image already carries for the agent (the agent is built
on the same host), so the guest gets a 15 kB file at /usr/sbin/pod-pause instead of a static
glibc's 680 kB. Dev mode and the agent tests exec the cached file itself.

`python -m initrd.pod_pause` prints the cached binary's path (building it if needed).
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from initrd.staged import staged_directory

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "rootfs-builder" / "pod-pause.c"
GUEST_PATH = "usr/sbin/pod-pause"  # on the agent's default PATH (vmm_task/server.find_program)
CC = "gcc"
# Stripped, no source path in the output: the bytes depend only on the source and the compiler.
FLAGS = ["-Os", "-s", "-Wall", "-Wextra", "-Werror", f"-ffile-prefix-map={REPO}=."]


def build(cache: Path) -> Path:
    """Path of the compiled binary in `cache`, compiled on first use."""
    if shutil.which(CC) is None:
        raise RuntimeError(f"no {CC}: `make setup` installs build-essential")
    version = subprocess.run([CC, "--version"], check=True, capture_output=True).stdout
    h = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version)
    binary = cache / "pod-pause" / h.hexdigest()[:20] / "pod-pause"
    if binary.exists():
        return binary
    with staged_directory(binary.parent) as staging:
        result = subprocess.run([CC, *FLAGS, "-o", str(staging / "pod-pause"), str(SOURCE)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{CC} {SOURCE.name} failed: {result.stderr.strip()}")
    return binary


def main() -> None:
    parser = argparse.ArgumentParser(description="Print the path of pod-pause built for this host.")
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args()
    from kernel.build import default_cache
    try:
        print(build(args.cache or default_cache()))
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"pod-pause: {e}")


if __name__ == "__main__":
    main()
