"""The agent binary: `vmm_task` compiled by Nuitka --standalone (a dist directory, not onefile:
onefile's bootstrap would be PID 1 and would unpack to /tmp on every boot).

The dist is cached in $VMM_TASK_CACHE/agent/<key>/ where key hashes the agent's sources
(vmm_task + vmm_common, generated protos included), the Nuitka and Python versions and the
options; Nuitka's C compiles go through ccache. Only what the agent imports is followed: grpc, ssl
and the host side are cut off so they can never reach the guest.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from initrd import elf

REPO = Path(__file__).resolve().parent.parent
SOURCE_PACKAGES = ("vmm_task", "vmm_common")
ENTRY = REPO / "vmm_task" / "__main__.py"
BINARY_NAME = "vmm-task"
KEEP_BUILDS = 6  # agent builds kept in the cache (~20 MB each)
# Never in the guest: host-only packages, TLS, test and packaging machinery.
NOFOLLOW = ("grpc", "grpc_tools", "host_sandboxer", "qemu", "ssl", "_ssl", "_hashlib", "sqlite3",
            "_sqlite3", "pytest", "_pytest", "unittest", "doctest", "pydoc", "tkinter",
            "setuptools", "pkg_resources", "pip", "distutils", "lib2to3", "idlelib", "ensurepip",
            "xmlrpc", "http", "urllib.request", "email", "nuitka")
# CJK codecs (~1 MB): Nuitka ships them with the encodings package whatever --nofollow says;
# only encodings.<cjk codec> would load them, so they are deleted from the dist.
UNSHIPPED_EXTENSIONS = ("_multibytecodec", "_codecs_cn", "_codecs_hk", "_codecs_iso2022",
                        "_codecs_jp", "_codecs_kr", "_codecs_tw")
# Nuitka carries most of the standard library as bytecode whether imported or not; these parts
# nothing in the agent imports (tests/unit/test_initrd_agent_imports.py checks it) stay out.
UNUSED_STDLIB = ("_pyio", "tarfile", "zipfile", "html", "pickletools", "imaplib", "configparser",
                 "importlib.metadata", "ftplib", "pydoc_data", "mailbox", "nntplib", "smtplib",
                 "poplib", "telnetlib", "cgi", "cgitb", "audioop", "wave", "aifc", "sunau", "chunk",
                 "sndhdr", "imghdr", "webbrowser", "turtle", "turtledemo", "pstats", "profile",
                 "cProfile", "trace", "tabnanny", "timeit", "pdb", "bdb", "code", "codeop", "pyclbr",
                 "py_compile", "compileall", "zipapp", "optparse", "xdrlib", "uu", "quopri",
                 "mailcap", "netrc", "nturl2path", "plistlib", "socketserver", "wsgiref", "smtpd",
                 "asynchat", "asyncore", "mimetypes", "getpass", "sched", "filecmp", "fileinput",
                 "graphlib", "rlcompleter", "crypt", "pipes", "spwd", "ossaudiodev", "nis",
                 "statistics", "fractions", "decimal", "_pydecimal", "_decimal", "xml", "pyexpat",
                 "zoneinfo", "sysconfig", "venv", "gzip", "tomllib")
# Module-level imports of ssl/unittest/sqlite3 inside pyroute2, neutralised (see the file).
PACKAGE_CONFIG = Path(__file__).resolve().parent / "nuitka-agent.yml"
OPTIONS = [
    "--standalone",
    "--python-flag=no_site",
    # Nothing in the agent, protobuf or pyroute2 reads a docstring at run time (pyroute2 copies
    # __doc__ around but takes None): -0.7 MB of idle Pss_Anon, -1 MB of binary.
    "--python-flag=no_docstrings",
    "--static-libpython=yes",
    "--lto=no",
    # PID 1 starts before /proc exists, where Nuitka looks for its own path by default: take it
    # from argv[0] ("/init") and realpath() it through the /init -> /sbin/init symlinks instead.
    "--experimental=force-unix-binary-name",
    "--include-module=google._upb._message",  # protobuf's C (upb) backend, loaded dynamically
    *(f"--nofollow-import-to={name}" for name in NOFOLLOW + UNUSED_STDLIB),
    f"--user-package-configuration-file={PACKAGE_CONFIG}",
    # Libraries as bytecode, not C: pyroute2 (145 modules, imported lazily for pod networking),
    # protobuf's Python layer and the generated *_pb2 (descriptors: data, not code). Compiled,
    # they would be most of the binary, and under TCG every MB of initrd is boot time.
    *(f"--noinclude-custom-mode={name}:bytecode"
      for name in ("pyroute2", "google.protobuf", "vmm_common.protos")),
    f"--output-filename={BINARY_NAME}",
    "--assume-yes-for-downloads",
    "--jobs=2",
]


@dataclass(frozen=True)
class Agent:
    dist: Path            # the Nuitka dist directory (binary + extension modules + libraries)
    binary: str           # file name of the executable inside dist
    modules: list[str]    # every module compiled into or shipped with the agent
    cached: bool
    key: str              # the cache key: same key, same sources and options

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.dist.rglob("*") if p.is_file())


def _versions() -> str:
    import nuitka.Version  # the build tool's own version, part of the cache key
    return f"nuitka {nuitka.Version.getNuitkaVersion()} python {sys.version}"


def cache_key(entry: Path = ENTRY) -> str:
    """The build's key: the tool versions, the options, how it is built and what is compiled
    (the agent's packages, or the one file of another entry such as the Python floor)."""
    h = hashlib.sha256(_versions().encode() + b"\0" + " ".join(OPTIONS).encode())
    for build_input in (Path(__file__), Path(elf.__file__), PACKAGE_CONFIG):  # how it is built
        h.update(build_input.read_bytes())
    sources = ([path for package in SOURCE_PACKAGES for path in sorted((REPO / package).rglob("*.py"))]
               if entry == ENTRY else [entry])
    for path in sources:
        h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:20]


def _module_list(build_dir: Path, dist: Path) -> list[str]:
    """Modules compiled to C (Nuitka writes module.<name>.c for each) and extension modules
    shipped in the dist; stdlib modules carried as bytecode are not listed."""
    compiled = {p.name[len("module."):-len(".c")] for p in build_dir.glob("module.*.c")}
    extensions = {".".join(p.relative_to(dist).with_suffix("").parts)
                  for p in dist.rglob("*.so") if not p.name.startswith("lib")}
    return sorted(compiled | extensions)


def ensure_agent(cache: Path, progress=print) -> Agent:
    return ensure_compiled(cache / "agent", ENTRY, progress)


def ensure_compiled(root: Path, entry: Path, progress=print) -> Agent:
    """`entry` compiled with the agent's options into root/<key>/dist, built once per key."""
    out = root / cache_key(entry)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = (out / "dist").is_dir()
        if not cached:
            _build(out, entry, progress)
            _prune(root, keep=KEEP_BUILDS)
    modules = (out / "modules.txt").read_text().split()
    return Agent(out / "dist", BINARY_NAME, modules, cached, out.name)


def _prune(root: Path, keep: int) -> None:
    """Delete all but the `keep` newest builds (and any stale .partial: builds hold the lock)."""
    dirs = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)
    partial = [d for d in dirs if d.name.endswith(".partial")]
    complete = [d for d in dirs if d not in partial]
    for old in partial + complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _build(out: Path, entry: Path, progress) -> None:
    if not entry.exists():
        raise FileNotFoundError(f"{entry} does not exist: nothing to compile")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    log_path = staging / "nuitka.log"
    # named by its cache directory: "agent", "python-floor"
    progress(f"{out.parent.name}: compiling with Nuitka (a few minutes; log {log_path})")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = ["nice", "-n", "10", sys.executable, "-m", "nuitka", *OPTIONS,
               f"--output-dir={staging}", str(entry)]
    with open(log_path, "w") as log:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log_path.read_text().splitlines()[-30:]
        raise RuntimeError("Nuitka build failed:\n" + "\n".join(tail))
    (staging / f"{entry.stem}.dist").rename(staging / "dist")
    for name in UNSHIPPED_EXTENSIONS:
        (staging / "dist" / f"{name}.so").unlink(missing_ok=True)
    for path in sorted((staging / "dist").rglob("*")):
        if path.is_file() and not path.is_symlink() and elf.is_elf(path):
            elf.drop_unused_dependencies(path)
    modules = _module_list(staging / f"{entry.stem}.build", staging / "dist")
    (staging / "modules.txt").write_text("\n".join(modules) + "\n")
    shutil.rmtree(staging / f"{entry.stem}.build")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
