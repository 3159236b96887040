"""Build the guest kernel from Debian's kernel source package (linux-source-6.1 on Debian 12,
linux-source-6.12 on Debian 13) and the fragments in fragments/: its bzImage, and the same kernel
as a stripped ELF (vmlinux), which QEMU boots through the PVH entry (docs/host-memory.md).

tinyconfig + fragments -> olddefconfig -> every requested option checked -> `nice make -j2 bzImage`,
with the patches of patches/<source package>/ applied for the build (reverted after it).
The result is cached in $VMM_TASK_CACHE/kernel/<key>/ where key hashes the fragments, the
patches, this package's code and the source package version: an unchanged kernel is never rebuilt. The object
directory is shared between keys so a changed fragment rebuilds incrementally; a file lock
serialises builds started by several people or processes at once.

    python -m kernel.build [--cache DIR]     # prints the vmlinux path
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from kernel import config

SOURCE_DIR = Path("/usr/src")
PATCHES_DIR = Path(__file__).resolve().parent / "patches"
_SOURCE_TARBALL = re.compile(r"(linux-source-(\d+)\.(\d+))\.tar\.xz")
MAKE = ["nice", "-n", "10", "make", "ARCH=x86_64", "-j2"]
# What the kernel would take from the clock, the object directory and the machine into its
# version string (`6.1.x (user@host) #N SMP <date>`): fixed, so that the same inputs give the same
# bzImage on any machine, cold or incremental (the date is the initrd's default SOURCE_DATE_EPOCH).
REPRODUCIBLE_ENV = {"KBUILD_BUILD_TIMESTAMP": "Tue Nov 14 22:13:20 UTC 2023", "KBUILD_BUILD_VERSION": "1",
                    "KBUILD_BUILD_USER": "vmm-task", "KBUILD_BUILD_HOST": "vmm-task"}


class KernelConfigError(RuntimeError):
    """Requested options that olddefconfig dropped (unmet dependencies or misspelt names)."""


@dataclass(frozen=True)
class Kernel:
    image: Path    # bzImage
    vmlinux: Path  # the same kernel as a stripped ELF with the PVH entry note
    release: str
    config_sha256: str
    cached: bool


def default_cache() -> Path:
    return Path(os.environ.get("VMM_TASK_CACHE", Path.home() / ".cache" / "vmm-task"))


@dataclass(frozen=True)
class Source:
    package: str    # linux-source-6.1
    tarball: Path   # /usr/src/linux-source-6.1.tar.xz


def kernel_source(src_dir: Path = SOURCE_DIR) -> Source:
    """Debian's kernel source tarball installed here; the newest if there are several."""
    found = [(tuple(map(int, m.group(2, 3))), m.group(1), path)
             for path in src_dir.glob("linux-source-*.tar.xz")
             if (m := _SOURCE_TARBALL.fullmatch(path.name))]
    if not found:
        raise RuntimeError(f"no {src_dir}/linux-source-*.tar.xz: `make setup` installs Debian's "
                           "kernel source (linux-source-6.1 on Debian 12, -6.12 on Debian 13)")
    _, package, tarball = max(found)
    return Source(package, tarball)


def source_version(source: Source) -> str:
    return subprocess.run(["dpkg-query", "-W", "-f=${Version}", source.package],
                          check=True, capture_output=True, text=True).stdout.strip()


def cache_key(version: str) -> str:
    """Hash of the fragments (names and contents), this package's code and the source version."""
    h = hashlib.sha256(version.encode())
    here = Path(__file__).resolve().parent
    for path in config.all_fragment_paths() + sorted(PATCHES_DIR.glob("*/*.patch")) + sorted(here.glob("*.py")):
        h.update(path.relative_to(here).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:20]


def _extract_source(src_root: Path, source: Source, version: str) -> Path:
    """Debian's tarball unpacked once per package version (outside the work tree)."""
    tree = src_root / version / source.package
    if (tree / "Makefile").exists():
        return tree
    partial = src_root / f"{version}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    subprocess.run(["nice", "-n", "10", "tar", "-xf", str(source.tarball), "-C", str(partial)],
                   check=True)
    shutil.rmtree(src_root / version, ignore_errors=True)
    partial.rename(src_root / version)
    return tree


def patch_paths(source: Source, patches_dir: Path = PATCHES_DIR) -> list[Path]:
    """The patches for this source package, in apply order (none for a package without a directory)."""
    return sorted((patches_dir / source.package).glob("*.patch"))


def _patch(tree: Path, patch: Path, log, *flags: str) -> bool:
    # --force, not --batch: --batch takes an unapplied patch given --reverse for a reversed one.
    return subprocess.run(["patch", "-p1", "--force", "--silent", "--no-backup-if-mismatch", *flags,
                           "-i", str(patch)], cwd=tree,
                          stdout=log, stderr=subprocess.STDOUT).returncode == 0


@contextlib.contextmanager
def patched(tree: Path, patches: list[Path], log):
    """`tree` with `patches` applied, reverted afterwards: the unpacked source is shared by every
    worktree's build (one per package version), and a build of another key must find it as Debian
    ships it. kbuild sees the files change both ways and rebuilds what depends on them. A patch
    found applied already (a build killed before it reverted) is taken as applied."""
    applied = []
    try:
        for patch in patches:
            if not _patch(tree, patch, log, "--dry-run", "--reverse"):
                if not (_patch(tree, patch, log, "--dry-run") and _patch(tree, patch, log)):
                    raise RuntimeError(f"kernel patch {patch} does not apply to {tree}")
            applied.append(patch)
        yield
    finally:
        for patch in reversed(applied):
            if not _patch(tree, patch, log, "--reverse"):
                raise RuntimeError(f"kernel patch {patch} could not be reverted in {tree}: "
                                   "restore that file from Debian's tarball")


def _make(tree: Path, obj: Path, log, *targets: str) -> None:
    subprocess.run(MAKE + ["-C", str(tree), f"O={obj}", *targets], check=True,
                   stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, **REPRODUCIBLE_ENV))


def configure(tree: Path, obj: Path, log, package: str) -> str:
    """tinyconfig, then the fragments (the common ones and `package`'s), then olddefconfig;
    returns the final .config text."""
    _make(tree, obj, log, "tinyconfig")
    dot_config = obj / ".config"
    requests = config.requested_options(config.fragment_paths(package))
    dot_config.write_text(config.apply_requests(dot_config.read_text(), requests))
    _make(tree, obj, log, "olddefconfig")
    final = dot_config.read_text()
    problems = config.missing_options(requests, final)
    if problems:
        raise KernelConfigError("kernel options missing from the final .config:\n  "
                                + "\n  ".join(problems))
    return final


def ensure_kernel(cache: Path | None = None, progress=print) -> Kernel:
    """The cached kernel for the current fragments, building it first if needed."""
    root = (cache or default_cache()) / "kernel"
    source = kernel_source()
    version = source_version(source)
    out = root / cache_key(version)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "vmlinux").exists():
            _build(root, out, source, version, progress)
            cached = False
        else:
            cached = True
    final = (out / "config").read_bytes()
    return Kernel(out / "bzImage", out / "vmlinux", (out / "release").read_text().strip(),
                  hashlib.sha256(final).hexdigest(), cached)


def _build(root: Path, out: Path, source: Source, version: str, progress) -> None:
    tree = _extract_source(root / "src", source, version)
    obj = root / "obj"
    obj.mkdir(exist_ok=True)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    log_path = staging / "build.log"
    progress(f"kernel: building {out.name} (a few minutes; log {log_path})")
    # The built-in initramfs (/dev/console, /root) carries KBUILD_BUILD_TIMESTAMP as its mtimes, but
    # kbuild does not remake it when only the environment changed: one left in the shared object
    # dir by an earlier build kept that build's clock (a cold rebuild then differed in it).
    (obj / "usr" / "initramfs_data.cpio").unlink(missing_ok=True)
    with open(log_path, "w") as log, patched(tree, patch_paths(source), log):
        final = configure(tree, obj, log, source.package)
        try:
            _make(tree, obj, log, "bzImage")
        except subprocess.CalledProcessError:
            tail = log_path.read_text().splitlines()[-30:]
            raise RuntimeError("kernel build failed:\n" + "\n".join(tail)) from None
    shutil.copy2(obj / "arch/x86/boot/bzImage", staging / "bzImage")
    # The ELF QEMU boots through the PVH entry (fragments/00-base.config), without its symbol
    # tables (not loaded; the notes QEMU reads the entry point from are allocated, so kept).
    subprocess.run(["objcopy", "--strip-all", str(obj / "vmlinux"), str(staging / "vmlinux")], check=True)
    (staging / "config").write_text(final)
    (staging / "release").write_text((obj / "include/config/kernel.release").read_text())
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args()
    try:
        kernel = ensure_kernel(args.cache, progress=lambda m: print(m, file=sys.stderr))
    except (KernelConfigError, RuntimeError) as e:
        sys.exit(str(e))
    print(kernel.vmlinux)


if __name__ == "__main__":
    main()
