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
    "lz4": ["lz4", "-l", "-12", "-q", "-c"],                  # -l: the legacy frame the kernel reads
    "none": ["cat"],
}
DEFAULT = "lz4"


def _command(method: str) -> list[str]:
    if method not in COMMANDS:
        raise ValueError(f"unknown initrd compression {method!r}; choose from {sorted(COMMANDS)}")
    return COMMANDS[method]


def compress(data: bytes, method: str = DEFAULT) -> bytes:
    return subprocess.run(_command(method), input=data, stdout=subprocess.PIPE, check=True).stdout


def decompress(data: bytes, method: str) -> bytes:
    """The inverse (used by the compression benchmark); `cat` for "none"."""
    command = _command(method)
    command = [command[0], "-d", "-c"] if method != "none" else command
    return subprocess.run(command, input=data, stdout=subprocess.PIPE, check=True).stdout
