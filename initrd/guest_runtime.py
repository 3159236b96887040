"""The guest's container runtime (crun, or runc) and its shared libraries, from the pinned Debian
13 packages of rootfs-builder/runtime-packages.txt, never from the build host.

The binary keeps its package path (/usr/bin/crun, /usr/sbin/runc: the agent finds it on PATH).
Its libraries, the dynamic loader included, are regular files named by soname in a directory of
their own, /usr/lib/vmm-task-runtime/: the binary's interpreter is that directory's loader and
its DT_RPATH that directory, so the runtime never meets the agent's libraries (whose libc is the
build host's). The closure is read from the extracted packages' ELF headers (NEEDED, resolved
in the packages' own library directories), not from the host's loader.

`python -m initrd.guest_runtime crun` prints the path of the same runtime made runnable on this
host (libraries in the cache): what dev mode and the agent tests run.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from initrd import debian, elf
from initrd.staged import staged_directory

REPO = Path(__file__).resolve().parent.parent
PINS = REPO / "rootfs-builder" / "runtime-packages.txt"
SUITE = "trixie"
# Runtime (its package's name) -> the binary's path in the package.
RUNTIMES = {"crun": "usr/bin/crun", "runc": "usr/sbin/runc"}
GUEST_LIB_DIR = "/usr/lib/vmm-task-runtime"


@dataclass(frozen=True)
class Library:
    data: bytes
    mode: int


@dataclass(frozen=True)
class Runtime:
    binary: str                        # the binary's path in its package, e.g. usr/bin/crun
    executable: bytes                  # the binary, patched to load from `lib_dir`
    lib_dir: str
    libraries: dict[str, Library]      # soname -> file, to go in `lib_dir`
    packages: list[debian.FetchedPackage]  # the packages a file was taken from


class _Packages:
    """The extracted packages, each under a root of its own so every file has an origin."""

    def __init__(self, fetched: list[debian.FetchedPackage], workdir: Path):
        self.roots: dict[str, Path] = {}
        for package in fetched:
            self.roots[package.name] = workdir / "packages" / package.name
            debian.extract(package, self.roots[package.name])
        self.lib_dirs = self._library_dirs()

    def _library_dirs(self) -> list[str]:
        """Where the packages' loader looks: the ld.so.conf.d entries they ship (libc6's
        multiarch dirs), then /lib and /usr/lib."""
        dirs = []
        for root in self.roots.values():
            for conf in sorted(root.glob("etc/ld.so.conf.d/*.conf")):
                dirs += [line.strip().strip("/") for line in conf.read_text().splitlines()
                         if line.strip().startswith("/")]
        return dirs + ["lib", "usr/lib"]

    def find(self, relative: str) -> tuple[str, Path] | None:
        """(package, real file) of `relative` in some package, symlinks followed inside it."""
        for name, root in self.roots.items():
            path = root / relative
            if path.exists():
                real = path.resolve()
                if not real.is_relative_to(root.resolve()):
                    raise debian.PackageError(f"{name}: /{relative} points outside the package")
                return name, real
        return None

    def library(self, soname: str) -> tuple[str, Path] | None:
        for directory in self.lib_dirs:
            if found := self.find(f"{directory}/{soname}"):
                return found
        return None


def _closure(packages: _Packages, sonames: list[str], binary: str,
             runtime: str) -> dict[str, tuple[str, Path]]:
    """soname -> (package, file) of `sonames` (what `binary` needs) and of all they need."""
    libs: dict[str, tuple[str, Path]] = {}
    todo = [(soname, binary) for soname in sonames]
    while todo:
        soname, wanted_by = todo.pop()
        if soname in libs:
            continue
        found = packages.library(soname)
        if found is None:
            raise debian.PackageError(
                f"{runtime}: {soname} (needed by {wanted_by}) is in none of the pinned packages "
                f"({', '.join(packages.roots)}): pin the package that ships it in {PINS}")
        libs[soname] = found
        todo += [(s, soname) for s in elf.needed(found[1])]
    return libs


def _selected_pins(runtime: str) -> list[debian.Pin]:
    """The runtime's package and every library package (not the other runtimes)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose from {sorted(RUNTIMES)}")
    pins = debian.read_pins(PINS)
    if runtime not in {pin.name for pin in pins}:
        raise debian.PackageError(f"{PINS} pins no {runtime} package")
    return [pin for pin in pins if pin.name == runtime or pin.name not in RUNTIMES]


def prepare(runtime: str, cache: Path, lib_dir: str = GUEST_LIB_DIR, progress=print) -> Runtime:
    """The runtime binary patched to load from `lib_dir`, and its libraries to put there."""
    fetched = debian.fetch(_selected_pins(runtime), SUITE, cache, progress)
    with tempfile.TemporaryDirectory(prefix="guest-runtime-") as tmp:
        packages = _Packages(fetched, Path(tmp))
        found = packages.find(RUNTIMES[runtime])
        if found is None:
            raise debian.PackageError(f"{runtime} package has no /{RUNTIMES[runtime]}")
        binary = Path(tmp) / runtime
        shutil.copyfile(found[1], binary)
        interpreter = elf.interpreter(binary)
        if interpreter is None:
            raise debian.PackageError(f"{runtime}: /{RUNTIMES[runtime]} has no dynamic loader")
        loader = Path(interpreter).name
        libs = _closure(packages, [loader, *elf.needed(binary)], binary.name, runtime)
        elf.set_loader(binary, f"{lib_dir}/{loader}", lib_dir)
        libraries = {soname: Library(path.read_bytes(), path.stat().st_mode & 0o777)
                     for soname, (_, path) in sorted(libs.items())}
        used = {runtime} | {package for package, _ in libs.values()}
        return Runtime(RUNTIMES[runtime], binary.read_bytes(), lib_dir, libraries,
                       [p for p in fetched if p.name in used])


def host_copy(runtime: str, cache: Path, progress=print) -> Path:
    """The same runtime runnable on this host (dev mode): the binary and its libraries under
    `cache`/runtime/<key>/, keyed by the pins and the code that patches; returns its path."""
    h = hashlib.sha256(runtime.encode() + PINS.read_bytes() + Path(__file__).read_bytes()
                       + Path(elf.__file__).read_bytes())
    root = cache / "runtime" / h.hexdigest()[:20]
    if (root / RUNTIMES[runtime]).exists():
        return root / RUNTIMES[runtime]
    prepared = prepare(runtime, cache, str(root / "lib"), progress)
    # Written beside `root`, then renamed to it: the binary names `root` (interpreter, rpath).
    with staged_directory(root) as staging:
        (staging / "lib").mkdir()
        for soname, library in prepared.libraries.items():
            (staging / "lib" / soname).write_bytes(library.data)
            (staging / "lib" / soname).chmod(library.mode)
        binary = staging / prepared.binary
        binary.parent.mkdir(parents=True)
        binary.write_bytes(prepared.executable)
        binary.chmod(0o755)
    return root / prepared.binary


def main() -> None:
    parser = argparse.ArgumentParser(description="Print the path of the guest's runtime made "
                                                 "runnable on this host (dev mode).")
    parser.add_argument("runtime", choices=sorted(RUNTIMES))
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args()
    from kernel.build import default_cache
    try:
        print(host_copy(args.runtime, args.cache or default_cache(),
                        progress=lambda m: print(m, file=sys.stderr)))
    except (debian.PackageError, OSError) as e:
        sys.exit(f"guest-runtime: {e}")


if __name__ == "__main__":
    main()
