"""The daemon's VM templates: one guest per VM size booted to "vmm-task ready" and saved, from
which pods' VMs are restored ([vm] template = true; docs/templates.md).

Layout (STATE_DIR is the daemon's --dir; RAM lives on tmpfs, where a clone's copy is cheap):
    STATE_DIR/.templates/<slot>/         one template per VM size (`slot`: c1-m512-x0)
        meta.json                        its key (a hash of every input) and image digest
        template.state                   the saved device state (tens of kB: x-ignore-shared)
    /dev/shm/vmm-sandboxer-<hash of STATE_DIR>/     0711
        <slot>-<key>.ram                 the template's guest RAM, root's, 0600, never written again
        <VM name>.ram                    a clone's sparse copy, owned by its QEMU's uid, 0600

A template is used only if its key is the one asked for; otherwise it is rebuilt, and every
template whose image (kernel, boot image, QEMU binary) differs is removed. The first pods of a
size wait for one build; a failed build fails them and the next pod tries again. The template's
QEMU runs as root without capabilities, not as a pod's uid: a pod's QEMU, whatever its guest
did to it, must not reach the guest every later clone starts from.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Awaitable, Callable

TEMPLATES_DIR = ".templates"
RAM_ROOT = Path("/dev/shm")
META = "meta.json"


class TemplateError(RuntimeError):
    pass


@dataclass(frozen=True)
class Template:
    slot: str
    key: str
    dir: Path  # where it is built (the sockets of its QEMU) and kept
    ram: Path
    state: Path
    # What the template's agent printed on its ready line (pid, rss, boot times): the agent of
    # every clone is that very process.
    reported: dict = field(default_factory=dict)


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


_file_digests: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file's contents, computed once per (path, inode, size, mtime)."""
    st = os.stat(path)
    stamp = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if stamp not in _file_digests:
        with open(path, "rb") as f:
            _file_digests[stamp] = hashlib.file_digest(f, "sha256").hexdigest()
    return _file_digests[stamp]


class TemplateStore:
    def __init__(self, state_root: Path, ram_root: Path = RAM_ROOT):
        self.dir = Path(state_root) / TEMPLATES_DIR
        self.ram_dir = ram_root / f"vmm-sandboxer-{digest(str(Path(state_root).absolute()))[:12]}"
        self._builds: dict[str, asyncio.Future] = {}

    async def get(self, slot: str, inputs: dict, image: str,
                  build: Callable[[Template], Awaitable[dict]]) -> Template:
        """The template of `slot` made from `inputs` (everything its guest depends on; `image`:
        the digest of its files), built by `build` (boot, save to template.state, return the
        agent's ready-line numbers) unless kept from before. TemplateError, or what `build`
        raised, if it cannot be had."""
        key = digest(inputs)
        template = Template(slot, key, self.dir / slot, self.ram_dir / f"{slot}-{key[:16]}.ram",
                            self.dir / slot / "template.state")
        for _ in range(2):  # the slot may be building another key (an image replaced meanwhile)
            if (usable := self._load(template)) is not None:
                return usable
            building = self._builds.get(slot)
            if building is None:
                building = asyncio.ensure_future(self._build(template, image, build))
                self._builds[slot] = building
                building.add_done_callback(lambda _: self._builds.pop(slot, None))
            await asyncio.shield(building)  # a pod given up on does not stop the others' build
        if (usable := self._load(template)) is None:
            raise TemplateError(f"template {slot} was built but is not there: {template.dir}")
        return usable

    def _load(self, template: Template) -> Template | None:
        """`template` as kept, if it is complete and of its key."""
        try:
            meta = json.loads((template.dir / META).read_text())
        except (OSError, ValueError):
            return None
        if meta.get("key") != template.key or not template.ram.is_file() or not template.state.is_file():
            return None
        return replace(template, reported=meta.get("reported") or {})

    async def _build(self, template: Template, image: str, build) -> None:
        self._remove_stale(template, image)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._make_ram_dir()
        template.dir.mkdir(mode=0o700)
        try:
            template.ram.unlink(missing_ok=True)  # a build the daemon died in left it
            os.close(os.open(template.ram, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))
            reported = await build(template)
            (template.dir / META).write_text(json.dumps({"key": template.key, "image": image,
                                                          "ram": str(template.ram), "reported": reported}))
        except BaseException:
            self._remove(template.dir, template.ram)
            raise

    def _make_ram_dir(self) -> None:
        """Ours, 0711: a clone's QEMU opens its own file there and lists nothing. /dev/shm is
        everyone's: a directory someone else made first (or a link) is refused, not used."""
        self.ram_dir.mkdir(mode=0o711, exist_ok=True)
        st = os.lstat(self.ram_dir)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise TemplateError(f"{self.ram_dir} is not a directory of ours (uid {st.st_uid}): remove it")
        os.chmod(self.ram_dir, 0o711)

    def _remove_stale(self, template: Template, image: str) -> None:
        """The slot's old template, and every template of another image."""
        if not self.dir.is_dir():
            return
        for kept in self.dir.iterdir():
            try:
                meta = json.loads((kept / META).read_text())
            except (OSError, ValueError):
                meta = {}
            if kept.name == template.slot or meta.get("image") != image:
                self._remove(kept, Path(meta["ram"]) if meta.get("ram") else None)

    @staticmethod
    def _remove(directory: Path, ram: Path | None) -> None:
        shutil.rmtree(directory, ignore_errors=True)
        if ram is not None:
            ram.unlink(missing_ok=True)

    def clone_ram_path(self, name: str) -> Path:
        """Where the RAM of the clone VM `name` is."""
        return self.ram_dir / f"{name}.ram"

    async def clone_ram(self, template: Template, name: str, uid: int | None) -> Path:
        """A sparse copy of the template's RAM for one clone, owned by `uid` (its QEMU's)."""
        ram = self.clone_ram_path(name)
        ram.unlink(missing_ok=True)
        cp = await asyncio.create_subprocess_exec("cp", "--sparse=always", str(template.ram), str(ram),
                                                  stderr=asyncio.subprocess.PIPE)
        _, err = await cp.communicate()
        if cp.returncode != 0:
            ram.unlink(missing_ok=True)
            raise TemplateError(f"cannot copy the template's RAM to {ram}: {err.decode(errors='replace').strip()}")
        os.chmod(ram, 0o600)
        if uid is not None:
            os.chown(ram, uid, uid)
        return ram
