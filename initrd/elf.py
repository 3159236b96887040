"""Shared-library closure of ELF binaries, resolved by the host's dynamic loader (ldd).

The guest gets exactly the libraries its binaries load (plus the loader itself), at the paths the
loader will look for them; static binaries and non-ELF files need nothing.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

# "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
_LIB = re.compile(r"^\s*(?:\S+ => )?(/\S+) \(0x[0-9a-f]+\)$")
_NOT_FOUND = re.compile(r"^\s*(\S+) => not found$")
_ELF_MAGIC = b"\x7fELF"


def is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == _ELF_MAGIC


def shared_libraries(binary: Path) -> set[str]:
    """Absolute paths of every library `binary` loads (transitively), loader included."""
    result = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    if result.returncode != 0:  # "not a dynamic executable": static, needs nothing
        return set()
    libs = set()
    for line in result.stdout.splitlines():
        if m := _NOT_FOUND.match(line):
            raise FileNotFoundError(f"{binary}: shared library {m.group(1)} not found on the host")
        if m := _LIB.match(line):
            libs.add(m.group(1))
    return libs


def closure(binaries: list[Path], provided: set[str] = frozenset()) -> set[str]:
    """Libraries needed by all `binaries` whose file names are not in `provided` (e.g. the ones
    Nuitka already ships next to the agent)."""
    needed: set[str] = set()
    for binary in binaries:
        if is_elf(binary):
            needed |= {lib for lib in shared_libraries(binary) if Path(lib).name not in provided}
    return needed


def unused_dependencies(binary: Path) -> list[str]:
    """Paths of the libraries `binary` lists as NEEDED but takes no symbol from (`ldd -u -r`)."""
    result = subprocess.run(["ldd", "-u", "-r", str(binary)], capture_output=True, text=True)
    return [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("/")]


def drop_unused_dependencies(binary: Path) -> list[str]:
    """Remove the NEEDED entries `unused_dependencies` finds, so the image need not carry those
    libraries (protobuf's upb extension names libstdc++, 2 MB, and uses none of it)."""
    dropped = []
    for lib in unused_dependencies(binary):
        soname = Path(lib).name
        subprocess.run(["patchelf", "--remove-needed", soname, str(binary)], check=True)
        dropped.append(soname)
    return dropped


def needed(binary: Path) -> list[str]:
    """The NEEDED sonames of an ELF file, read from the file itself (not resolved by any loader:
    works for binaries of another release than the host's)."""
    result = subprocess.run(["patchelf", "--print-needed", str(binary)], check=True,
                            capture_output=True, text=True)
    return result.stdout.split()


def interpreter(binary: Path) -> str | None:
    """The PT_INTERP of an executable (its dynamic loader); None when it has none (static)."""
    result = subprocess.run(["patchelf", "--print-interpreter", str(binary)],
                            capture_output=True, text=True)
    return (result.stdout.strip() or None) if result.returncode == 0 else None


def set_loader(binary: Path, interpreter_path: str, library_dir: str) -> None:
    """Make `binary` load with `interpreter_path` and find its libraries in `library_dir`
    first. DT_RPATH (--force-rpath), not RUNPATH: RPATH also applies to the libraries' own
    NEEDED entries and precedes LD_LIBRARY_PATH, so the whole closure comes from there."""
    subprocess.run(["patchelf", "--set-interpreter", interpreter_path, "--force-rpath",
                    "--set-rpath", library_dir, str(binary)], check=True)
