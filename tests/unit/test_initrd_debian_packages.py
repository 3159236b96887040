"""The guest runtime's pinned Debian packages (initrd/debian.py): pins parsed strictly, a pinned
version the index lacks named, a .deb whose sha256 is not the index's refused (downloaded or
cached), the host's own Debian mirror found in its apt sources. Local files only, no network:
the index and the .debs are small files the tests write."""
import hashlib
from pathlib import Path

import pytest

from initrd import debian, guest_runtime

DEB = b"!<arch>\nnot really a package, but bytes with a known sha256\n"


def stanza(name: str, version: str, data: bytes) -> str:
    return (f"Package: {name}\nVersion: {version}\nArchitecture: amd64\n"
            f"Filename: pool/main/{name[0]}/{name}/{name}_{version}_amd64.deb\n"
            f"Size: {len(data)}\nSHA256: {hashlib.sha256(data).hexdigest()}\n"
            f"Description: test\n continuation line: not a field\n")


INDEX = "\n".join([stanza("libfoo1", "1.0-1", b"foo"), stanza("crun", "1.21-1", DEB),
                   stanza("crun", "1.22-1", b"newer"), stanza("crun-dev", "1.21-1", b"dev")])


def test_pins_are_name_equals_version_each_name_once(tmp_path):
    pins = tmp_path / "pins.txt"
    pins.write_text("# comment\ncrun=1.21-1  # trailing\n\nlibcap2=1:2.75-10+deb13u1+b3\n")
    assert debian.read_pins(pins) == [debian.Pin("crun", "1.21-1"),
                                      debian.Pin("libcap2", "1:2.75-10+deb13u1+b3")]
    pins.write_text("crun=1.21-1\ncrun=1.22-1\n")
    with pytest.raises(debian.PackageError, match=r"pins.txt:2: crun is pinned twice"):
        debian.read_pins(pins)
    pins.write_text("crun 1.21-1\n")
    with pytest.raises(debian.PackageError, match=r"pins.txt:1: expected name=version, got 'crun 1.21-1'"):
        debian.read_pins(pins)


def test_the_committed_pins_name_both_runtimes():
    names = {pin.name for pin in debian.read_pins(guest_runtime.PINS)}
    assert set(guest_runtime.RUNTIMES) <= names and "libc6" in names


def test_the_index_gives_every_version_of_exactly_the_names_asked():
    index = debian.parse_index(INDEX.encode(), {"crun", "absent"})
    assert [e.version for e in index["crun"]] == ["1.21-1", "1.22-1"]  # not crun-dev's
    assert index["absent"] == []
    entry = debian.entry_for(debian.Pin("crun", "1.21-1"), index, "trixie")
    assert (entry.sha256, entry.size) == (hashlib.sha256(DEB).hexdigest(), len(DEB))


def test_a_pinned_version_the_index_lacks_is_named_with_the_versions_it_has():
    index = debian.parse_index(INDEX.encode(), {"crun", "runc"})
    with pytest.raises(debian.PackageError) as e:
        debian.entry_for(debian.Pin("crun", "1.20-1"), index, "trixie")
    assert str(e.value).startswith("crun 1.20-1 is not in Debian trixie's index (it has: "
                                   "1.21-1, 1.22-1)")
    with pytest.raises(debian.PackageError, match=r"runc 1.1-1 is not in .* \(it has: none\)"):
        debian.entry_for(debian.Pin("runc", "1.1-1"), index, "trixie")


def test_a_download_with_another_sha256_is_refused_and_not_cached(tmp_path):
    entry = debian.entry_for(debian.Pin("crun", "1.21-1"),
                             debian.parse_index(INDEX.encode(), {"crun"}), "trixie")
    downloaded = tmp_path / "crun_1.21-1_amd64.deb"
    downloaded.write_bytes(DEB + b"one byte more")
    with pytest.raises(debian.PackageError) as e:
        debian.store(downloaded, entry, tmp_path / "debs")
    actual = hashlib.sha256(DEB + b"one byte more").hexdigest()
    assert str(e.value) == (f"crun 1.21-1: crun_1.21-1_amd64.deb has sha256 {actual}, the "
                            f"Packages index says {entry.sha256}: refused")
    assert not (tmp_path / "debs").exists() or not list((tmp_path / "debs").iterdir())

    downloaded.write_bytes(DEB)
    stored = debian.store(downloaded, entry, tmp_path / "debs")
    assert stored == tmp_path / "debs" / f"{entry.sha256}.deb" and stored.read_bytes() == DEB


def test_a_cached_deb_with_other_bytes_is_dropped(tmp_path):
    entry = debian.entry_for(debian.Pin("crun", "1.21-1"),
                             debian.parse_index(INDEX.encode(), {"crun"}), "trixie")
    debs = tmp_path / "debs"
    debs.mkdir()
    (debs / f"{entry.sha256}.deb").write_bytes(DEB)
    assert debian.cached(entry, debs) == debs / f"{entry.sha256}.deb"
    (debs / f"{entry.sha256}.deb").write_bytes(DEB[:-1])  # truncated
    assert debian.cached(entry, debs) is None
    assert not (debs / f"{entry.sha256}.deb").exists()


def private_lists(cache: Path) -> Path:
    """An index as a previous `apt-get update` of the private configuration would have left it."""
    lists = cache / "debian" / "trixie" / "state" / "lists"
    lists.mkdir(parents=True)
    (lists / "mirror_debian_dists_trixie_main_binary-amd64_Packages").write_text(INDEX)
    return lists


def test_fetch_uses_the_verified_cache_without_apt(tmp_path, monkeypatch):
    monkeypatch.setenv(debian.MIRROR_VARIABLE, "file:///nonexistent")  # apt would fail here
    private_lists(tmp_path)
    entry_sha = hashlib.sha256(DEB).hexdigest()
    (tmp_path / "debian" / "debs").mkdir(parents=True)
    (tmp_path / "debian" / "debs" / f"{entry_sha}.deb").write_bytes(DEB)
    [fetched] = debian.fetch([debian.Pin("crun", "1.21-1")], "trixie", tmp_path)
    assert (fetched.name, fetched.version, fetched.sha256) == ("crun", "1.21-1", entry_sha)


def test_fetch_never_uses_a_tampered_cached_deb(tmp_path, monkeypatch):
    """The cached file is dropped and apt asked again; here apt cannot reach any mirror, so the
    build fails naming the package instead of using the bad bytes."""
    monkeypatch.setenv(debian.MIRROR_VARIABLE, "file:///nonexistent")
    private_lists(tmp_path)
    entry_sha = hashlib.sha256(DEB).hexdigest()
    (tmp_path / "debian" / "debs").mkdir(parents=True)
    (tmp_path / "debian" / "debs" / f"{entry_sha}.deb").write_bytes(b"tampered")
    with pytest.raises(debian.PackageError, match=r"apt-get download crun=1.21-1 failed"):
        debian.fetch([debian.Pin("crun", "1.21-1")], "trixie", tmp_path)
    assert not (tmp_path / "debian" / "debs" / f"{entry_sha}.deb").exists()


def test_the_host_mirror_is_the_main_source_of_its_own_release(tmp_path, monkeypatch):
    monkeypatch.delenv(debian.MIRROR_VARIABLE, raising=False)
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    (parts / "debian.sources").write_text(
        "Types: deb\n# http://commented.example/debian\nURIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    (parts / "other.list").write_text("deb http://elsewhere.example/apt stable main\n")
    assert debian.host_mirror((parts,), "bookworm") == "http://mirror.example/debian"

    one_line = tmp_path / "sources.list"
    one_line.write_text("# deb http://old.example/debian trixie main\n"
                        "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian trixie main contrib\n")
    assert debian.host_mirror((one_line,), "trixie") == "http://one.example/debian"
    with pytest.raises(debian.PackageError, match=r"no apt source for Debian sid main .* "
                                                  r"set VMM_TASK_DEBIAN_MIRROR"):
        debian.host_mirror((one_line, parts), "sid")
    monkeypatch.setenv(debian.MIRROR_VARIABLE, "http://override.example/debian/")
    assert debian.host_mirror((one_line,), "sid") == "http://override.example/debian"
