"""Initrd compressors, with the flags the kernel's decompressors need and deterministic output.

The default is chosen by measurement under TCG (docs/guest-image.md); each choice needs its
CONFIG_RD_* in kernel/fragments/95-initrd.config.
"""
from __future__ import annotations

import subprocess

# name -> command reading stdin, writing stdout. Single-threaded (-T1) where threads change bytes.
COMMANDS = {
    "gzip": ["gzip", "-9", "-n", "-c"],                       # -n: no name/mtime in the header
    "xz": ["xz", "-9", "--check=crc32", "-T1", "-c"],         # the kernel's xz wants crc32
    "zstd": ["zstd", "-19", "-T1", "-q", "-c"],
    "lz4": ["lz4", "-l", "-9", "-q", "-c"],                   # -l: the legacy frame the kernel reads
    "none": ["cat"],
}
DEFAULT = "zstd"


def compress(data: bytes, method: str = DEFAULT) -> bytes:
    if method not in COMMANDS:
        raise ValueError(f"unknown initrd compression {method!r}; choose from {sorted(COMMANDS)}")
    return subprocess.run(COMMANDS[method], input=data, stdout=subprocess.PIPE,
                          check=True).stdout
