"""Volumes Kuasar's host asks the guest to mount itself: the `storages` of a container
(vmm/common/src/storage.rs; chosen by vmm/sandbox/src/storage/mod.rs, mounted by the guest in
vmm/task/src/sandbox.rs). The container's spec already binds each storage's `mount_point`.

The host hands over only the storages it could not mount into the shared directory itself
(`need_guest_handle`): an emptyDir with medium Memory (driver `ephemeral`: a tmpfs of the
guest's memory, its `size=` taken from the host's tmpfs) and a block device it hot-plugged
(driver `blk`: virtio-blk at a PCI address, pci.py; `scsi`: a SCSI disk, which this guest
kernel does not drive). Binds and overlays are mounted by the host into the shared directory
and reach the guest as ordinary bind mounts of the spec.

A storage belongs to the host's volume (`host_source` + `type`): containers of the pod naming
the same volume share one mount, unmounted when the last of them is deleted.
"""

import asyncio
import json
import logging
import os
from typing import NamedTuple

from vmm_task.container.errors import TaskError, failed_precondition, invalid_argument
from vmm_task.container.mounts import mount, unmount

log = logging.getLogger(__name__)

EPHEMERAL, BLOCK, SCSI = "ephemeral", "blk", "scsi"


class Storage(NamedTuple):
    volume: tuple[str, str]  # the host's (host_source, type): one mount per volume in the pod
    id: str
    driver: str
    source: str
    fstype: str
    options: tuple[str, ...]
    mount_point: str


def parse_storages(text: str, where: str) -> list[Storage]:
    """Kuasar's JSON list of storages (the `io.kuasar.storages` annotation or storage file)."""
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise invalid_argument(f"{where}: storages are not JSON: {e}") from None
    if not isinstance(raw, list):
        raise invalid_argument(f"{where}: storages must be a JSON list")
    return [_storage(item, f"{where}: storage {index}") for index, item in enumerate(raw)]


def _storage(item, what: str) -> Storage:
    if not isinstance(item, dict):
        raise invalid_argument(f"{what} is not an object")
    fields = {}
    for name in ("host_source", "type", "id", "driver", "source", "fstype", "mount_point"):
        value = item.get(name, "")
        if not isinstance(value, str) or "\0" in value:
            raise invalid_argument(f"{what}: {name} must be a string")
        fields[name] = value
    options = item.get("options", [])
    if not isinstance(options, list) or not all(isinstance(o, str) and "\0" not in o
                                                for o in options):
        raise invalid_argument(f"{what}: options must be a list of strings")
    what = f"storage {fields['id'] or '(no id)'}"
    point = fields["mount_point"]
    if not os.path.isabs(point) or os.path.normpath(point) != point or point == "/":
        raise invalid_argument(f"{what}: mount_point {point!r} must be a normalised absolute "
                               "path other than /")
    if not fields["driver"] or not fields["fstype"]:
        raise invalid_argument(f"{what}: driver and fstype are required")
    return Storage((fields["host_source"], fields["type"]), fields["id"], fields["driver"],
                   fields["source"], fields["fstype"], tuple(options), point)


class StorageTable:
    """The pod's guest-mounted storages and the containers using each."""

    def __init__(self):
        self._mounted: dict[tuple[str, str], tuple[Storage, set[str]]] = {}
        self._lock = asyncio.Lock()

    async def acquire(self, cid: str, storages: list[Storage]) -> None:
        """Mount what is not mounted yet and count `cid` as a user of each; on failure the
        container uses none of them."""
        async with self._lock:
            try:
                for storage in storages:
                    entry = self._mounted.get(storage.volume)
                    if entry is None:
                        await _mount(storage)
                        entry = self._mounted[storage.volume] = (storage, set())
                    entry[1].add(cid)
            except BaseException:
                self.release(cid)
                raise

    def release(self, cid: str) -> None:
        """`cid` is gone: unmount the storages nobody else uses."""
        for volume, (storage, users) in list(self._mounted.items()):
            users.discard(cid)
            if not users:
                del self._mounted[volume]
                _unmount(storage)


async def _mount(storage: Storage) -> None:
    what = f"storage {storage.id}"
    if storage.driver == EPHEMERAL:
        source = storage.source or "tmpfs"
    elif storage.driver == BLOCK:
        from vmm_task.kuasar.pci import block_device
        source = await block_device(storage.source, what)
    elif storage.driver == SCSI:
        raise failed_precondition(f"{what}: a SCSI disk, but this guest kernel has no SCSI "
                                  "support: attach block volumes over virtio-blk (Kuasar: "
                                  "block_device_driver = \"VirtioBlk\")")
    else:
        raise invalid_argument(f"{what}: driver {storage.driver!r} is not supported (the guest "
                               f"mounts {EPHEMERAL} and {BLOCK} storages)")
    try:
        os.makedirs(storage.mount_point, exist_ok=True)
        mount(source, storage.mount_point, storage.fstype, storage.options)
    except OSError as e:
        raise TaskError("UNKNOWN", f"{what}: cannot mount {source} ({storage.fstype}) on "
                                   f"{storage.mount_point}: {e.strerror or e}") from None
    log.info("%s: %s (%s) mounted on %s", what, source, storage.fstype, storage.mount_point)


def _unmount(storage: Storage) -> None:
    try:
        unmount(storage.mount_point)
        os.rmdir(storage.mount_point)
    except OSError as e:
        log.warning("storage %s: cannot remove %s: %s", storage.id, storage.mount_point, e)
