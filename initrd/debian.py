"""Pinned Debian packages for the guest, fetched with apt under a private configuration.

The guest's container runtime must not depend on the build host's release (Debian 12's crun
1.8.1 refuses the `ociVersion` containerd 2.4 writes), so it comes from packages of a suite
chosen for the guest, pinned to exact versions in a committed file (`name=version` lines).

apt runs with its own configuration, sources list, state and cache under
`$VMM_TASK_CACHE/debian/<suite>/` (APT_CONFIG; the host's apt.conf.d, sources and dpkg status
are never read, nothing is installed): `apt-get update` checks the suite's signature against
the host's Debian archive keyring, `apt-get download` fetches a pinned .deb. Each .deb is
verified against the SHA256 of the signed Packages index and kept as `debs/<sha256>.deb`, so an
unchanged image needs no network; a cached file is verified again before every use.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
HOST_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
MIRROR_VARIABLE = "VMM_TASK_DEBIAN_MIRROR"
_PIN = re.compile(r"^([a-z0-9][a-z0-9+.-]+)=([0-9][A-Za-z0-9.+~:-]*)$")


class PackageError(RuntimeError):
    """A pinned package that cannot be had as pinned: absent from the index, or not the bytes
    the signed index describes."""


@dataclass(frozen=True)
class Pin:
    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}={self.version}"


@dataclass(frozen=True)
class IndexEntry:
    """What the suite's Packages index says about one package version."""
    name: str
    version: str
    filename: str
    size: int
    sha256: str


@dataclass(frozen=True)
class FetchedPackage:
    name: str
    version: str
    sha256: str
    path: Path


def read_pins(path: Path) -> list[Pin]:
    """`name=version` per line (comments and blank lines allowed), each name once."""
    pins: dict[str, Pin] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = _PIN.match(line)
        if m is None:
            raise PackageError(f"{path}:{number}: expected name=version, got {line!r}")
        if m.group(1) in pins:
            raise PackageError(f"{path}:{number}: {m.group(1)} is pinned twice")
        pins[m.group(1)] = Pin(m.group(1), m.group(2))
    return list(pins.values())


def parse_index(data: bytes, names: set[str]) -> dict[str, list[IndexEntry]]:
    """The stanzas of a Packages index for the packages in `names`, every version listed. (A
    suite's index is ~60 MB: each name is looked up with bytes.find, nothing else is parsed.)"""
    found: dict[str, list[IndexEntry]] = {name: [] for name in names}
    data = b"\n" + data
    for name in sorted(names):
        needle = f"\nPackage: {name}\n".encode()
        start = data.find(needle)
        while start >= 0:
            end = data.find(b"\n\n", start + 1)
            stanza = data[start + 1:None if end < 0 else end].decode()
            fields = dict(re.findall(r"(?m)^([A-Za-z0-9-]+): ?(.*)$", stanza))
            try:
                found[name].append(IndexEntry(name, fields["Version"], fields["Filename"],
                                              int(fields["Size"]), fields["SHA256"]))
            except (KeyError, ValueError) as e:
                raise PackageError(f"Packages index: the stanza of {name} lacks a valid {e}") from None
            start = data.find(needle, start + 1)
    return found


def entry_for(pin: Pin, index: dict[str, list[IndexEntry]], suite: str) -> IndexEntry:
    for entry in index.get(pin.name, []):
        if entry.version == pin.version:
            return entry
    versions = ", ".join(e.version for e in index.get(pin.name, [])) or "none"
    raise PackageError(f"{pin.name} {pin.version} is not in Debian {suite}'s index (it has: "
                       f"{versions}); update the pin in the packages file")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, entry: IndexEntry) -> None:
    """Refuse a .deb whose bytes are not the ones the signed index describes."""
    actual = sha256_file(path)
    if actual != entry.sha256:
        raise PackageError(f"{entry.name} {entry.version}: {path.name} has sha256 {actual}, the "
                           f"Packages index says {entry.sha256}: refused")


def store(downloaded: Path, entry: IndexEntry, debs: Path) -> Path:
    """Move a downloaded .deb into the cache under its sha256, once verified."""
    verify(downloaded, entry)
    debs.mkdir(parents=True, exist_ok=True)
    target = debs / f"{entry.sha256}.deb"
    os.replace(downloaded, target)
    return target


def cached(entry: IndexEntry, debs: Path) -> Path | None:
    """The cached .deb of `entry`, verified; None if absent. A cached file with other bytes
    (truncated, tampered) is deleted so it is fetched again."""
    path = debs / f"{entry.sha256}.deb"
    if not path.exists():
        return None
    try:
        verify(path, entry)
    except PackageError:
        path.unlink()
        return None
    return path


def _deb822_entries(text: str) -> list[dict[str, str]]:
    """Stanzas of a deb822 sources file (`Types:`, `URIs:`, `Suites:`...), comments dropped."""
    entries = []
    for stanza in re.split(r"\n\s*\n", text):
        lines = [line for line in stanza.splitlines() if not line.lstrip().startswith("#")]
        fields = dict(re.findall(r"(?m)^([A-Za-z-]+):\s*(.*)$", "\n".join(lines)))
        if fields:
            entries.append({k.lower(): v for k, v in fields.items()})
    return entries


def _one_line_entries(text: str) -> list[dict[str, str]]:
    """`deb [options] URI suite components...` lines as deb822-like dicts."""
    entries = []
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(words) >= 3:
            entries.append({"types": words[0], "uris": words[1], "suites": words[2],
                            "components": " ".join(words[3:])})
    return entries


def host_codename(os_release: Path = Path("/etc/os-release")) -> str:
    fields = dict(re.findall(r'(?m)^([A-Z_]+)="?([^"\n]*)"?$', os_release.read_text()))
    return fields.get("VERSION_CODENAME", "")


def host_mirror(sources: tuple[Path, ...] = HOST_SOURCES, codename: str | None = None) -> str:
    """The archive URI this machine's own apt uses for its Debian release (so the guest's
    packages come the way the host's do), or $VMM_TASK_DEBIAN_MIRROR."""
    if os.environ.get(MIRROR_VARIABLE):
        return os.environ[MIRROR_VARIABLE].rstrip("/")
    codename = codename or host_codename()
    files = [p for src in sources if src.exists()
             for p in (sorted(src.iterdir()) if src.is_dir() else [src])]
    for path in files:
        if path.name.endswith(".sources"):
            entries = _deb822_entries(path.read_text())
        elif path.name.endswith(".list"):
            entries = _one_line_entries(path.read_text())
        else:
            continue
        for entry in entries:
            if ("deb" in entry.get("types", "").split() and entry.get("enabled", "yes") != "no"
                    and codename in entry.get("suites", "").split()
                    and "main" in entry.get("components", "").split()):
                return entry["uris"].split()[0].rstrip("/")
    raise PackageError(f"no apt source for Debian {codename or '(unknown release)'} main in "
                       f"{', '.join(map(str, sources))}: set {MIRROR_VARIABLE} to a Debian "
                       "archive URI")


class PrivateApt:
    """apt for one suite with everything under `root`: its own apt.conf, sources list, lists,
    archives and an empty dpkg status (the host's installed packages play no part). The mirror
    is looked up (host_mirror) only when apt must reach it."""

    def __init__(self, root: Path, suite: str, mirror: str | None = None, keyring: Path = KEYRING):
        self.root, self.suite, self.keyring = root, suite, keyring
        self._mirror = mirror
        self.config = root / "apt.conf"

    @property
    def mirror(self) -> str:
        if self._mirror is None:
            self._mirror = host_mirror()
        return self._mirror

    def _configure(self) -> None:
        for d in ("etc/apt.conf.d", "etc/preferences.d", "etc/sources.list.d",
                  "state/lists/partial", "cache/archives/partial", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "state" / "status").touch()
        (self.root / "etc" / "sources.list").write_text(
            f"deb [signed-by={self.keyring}] {self.mirror} {self.suite} main\n")
        r = self.root
        # The cache lives in the invoking user's home, which apt's sandbox user (_apt) may not
        # enter: downloads run as the caller. Signatures and hashes are checked all the same.
        self.config.write_text("\n".join([
            f'Dir::Etc "{r}/etc/";', 'Dir::Etc::main "/dev/null";',
            f'Dir::Etc::parts "{r}/etc/apt.conf.d/";', f'Dir::State "{r}/state/";',
            f'Dir::State::status "{r}/state/status";', f'Dir::Cache "{r}/cache/";',
            f'Dir::Log "{r}/log/";', 'APT::Sandbox::User "root";',
            'Acquire::Languages "none";', 'Acquire::GzipIndexes "false";', ""]))

    def _apt(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        self._configure()
        env = dict(os.environ, APT_CONFIG=str(self.config), LC_ALL="C")
        return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True)

    def update(self) -> None:
        if not self.keyring.exists():
            raise PackageError(f"{self.keyring} is missing (apt-get install debian-archive-keyring)")
        result = self._apt("apt-get", "update", "-q")
        output = result.stdout + result.stderr
        problems = [line for line in output.splitlines() if line.startswith(("E:", "W:", "Err:"))]
        if result.returncode != 0 or problems:
            hint = (f" ({self.keyring} lacks Debian {self.suite}'s archive keys: Debian 12 has "
                    "them from debian-archive-keyring 2023.3+deb12u2 on)"
                    if "NO_PUBKEY" in output else "")
            raise PackageError(f"apt-get update of Debian {self.suite} from {self.mirror} "
                               f"failed{hint}:\n  " + "\n  ".join(problems or [result.stderr]))

    def index(self, names: set[str]) -> dict[str, list[IndexEntry]]:
        """Every version of the packages in `names` in the lists the last update fetched."""
        found: dict[str, list[IndexEntry]] = {name: [] for name in names}
        for path in sorted((self.root / "state" / "lists").glob("*_Packages")):
            for name, entries in parse_index(path.read_bytes(), names).items():
                found[name] += entries
        return found

    def download(self, entry: IndexEntry, into: Path) -> Path:
        result = self._apt("apt-get", "download", "-q", f"{entry.name}={entry.version}", cwd=into)
        debs = list(into.glob("*.deb"))
        if result.returncode != 0 or len(debs) != 1:
            raise PackageError(f"apt-get download {entry.name}={entry.version} failed: "
                               f"{result.stderr.strip() or result.stdout.strip()}")
        return debs[0]


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _has_all(index: dict[str, list[IndexEntry]], pins: list[Pin]) -> bool:
    return all(pin.version in {e.version for e in index.get(pin.name, [])} for pin in pins)


def fetch(pins: list[Pin], suite: str, cache: Path, progress=print) -> list[FetchedPackage]:
    """Every pinned package as a verified .deb in `cache`/debian/debs/. apt reaches the network
    only for what the cache lacks: the suite's index when a pin is not in the lists already
    fetched, a .deb when its sha256 is not cached."""
    base = cache / "debian"
    debs = base / "debs"
    with _locked(base / ".lock"):
        apt = PrivateApt(base / suite, suite)
        names = {pin.name for pin in pins}
        index = apt.index(names)
        if not _has_all(index, pins):
            progress(f"fetching Debian {suite}'s package index")
            apt.update()
            index = apt.index(names)
        fetched = []
        for pin in pins:
            entry = entry_for(pin, index, suite)
            path = cached(entry, debs)
            if path is None:
                with tempfile.TemporaryDirectory(dir=base) as tmp:
                    path = store(apt.download(entry, Path(tmp)), entry, debs)
            fetched.append(FetchedPackage(pin.name, pin.version, entry.sha256, path))
        return fetched


def extract(package: FetchedPackage, root: Path) -> None:
    """Unpack a .deb's files under `root` (dpkg-deb -x: no maintainer scripts, no dpkg database)."""
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(package.path), str(root)], check=True)
