"""A model of what Kuasar's vmm-sandboxer (kuasar-io/kuasar vmm/sandbox/src) prepares in a pod's
shared directory, for tests that drive our agent the way Kuasar's host and containerd do. Our
own code, written from Kuasar's source; each step names the file it follows:

- sandbox files (sandbox.rs setup_sandbox_files): `hostname`, `hosts`, `resolv.conf`;
- a container (container/handler/mod.rs, handlers in that order): its bundle directory
  (append.rs); namespaces: network and cgroup dropped, ipc/uts (and pid when the pod shares
  one) at `<sandbox-ns>/<type>` (ns.rs); storages for the rootfs and the spec's mounts
  (storage/mod.rs attach_storage): an overlay rootfs or a bind is mounted by the host into
  the shared directory as `storage<N>`, a tmpfs emptyDir becomes an `ephemeral` storage the
  guest mounts; the spec rewritten to them and the `io.kuasar.storages` annotation plus the
  `storage-<id>` file (handler/storage.rs); the io file `io-<id>` (handler/io.rs); the
  pod's files bound in and `config.json` written (handler/spec.rs);
- an exec's io file `io-<id>-<exec-id>` (handler/process.rs).
Hot-plugging is the caller's (QMP): a virtio-serial port for a FIFO (io.rs attach_pipe), whose
names (or `scheme://` addresses, which Kuasar passes through) it passes as `io`, and a block
device (`attach_block`).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

STORAGES_ANNOTATION = "io.kuasar.storages"
PROPAGATION = {"shared", "rshared", "slave", "rslave", "private", "rprivate", "unbindable",
               "runbindable"}


class KuasarHost:
    """`share`: the shared directory on this host; `guest_share`: where the guest sees it
    (/run/kuasar/state); `guest_storages`: where the guest mounts ephemeral storages
    (/run/kuasar/storage/containers); `sandbox_ns`: the guest's pod namespaces
    (/run/sandbox-ns)."""

    def __init__(self, share: Path, guest_share: str, guest_storages: str, sandbox_ns: str):
        self.share = share
        self.guest_share = guest_share
        self.guest_storages = guest_storages
        self.sandbox_ns = sandbox_ns
        self.storages: list[dict] = []
        self._last_id = 0
        self._host_mounts: dict[str, Path] = {}  # storage id -> its mount in the share

    # -- the pod ------------------------------------------------------------------------------

    def write_sandbox_files(self, hostname: str, resolv_conf: str) -> None:
        self.share.mkdir(parents=True, exist_ok=True)
        (self.share / "hostname").write_text(hostname + "\n")
        shutil.copyfile("/etc/hosts", self.share / "hosts")
        (self.share / "resolv.conf").write_text(resolv_conf)

    # -- a container -----------------------------------------------------------------------------

    def append_container(self, cid: str, spec: dict, rootfs: list[dict], io: dict | None,
                         share_pid: bool = False) -> Path:
        """Everything Kuasar's host does before containerd's Task.Create for `cid`; `spec` is
        containerd's, `rootfs` containerd's rootfs mounts ({type, source, options}). Returns
        the bundle in the share."""
        spec = copy.deepcopy(spec)
        bundle = self.share / cid
        bundle.mkdir(parents=True)
        self._namespaces(spec, share_pid)
        for mount in rootfs:
            self._attach(cid, mount, rootfs=True)
        for mount in spec.get("mounts", []):
            self._attach(cid, mount, rootfs=False)
        guest_storages = self._use_storages(cid, spec, rootfs)
        storages_text = json.dumps(guest_storages)
        spec.setdefault("annotations", {})[STORAGES_ANNOTATION] = storages_text
        (bundle / f"storage-{cid}").write_text(storages_text)
        if io is not None:
            (bundle / f"io-{cid}").write_text(json.dumps(io))
        spec.get("process", {}).pop("apparmorProfile", None)
        self._pod_files(spec)
        (bundle / "config.json").write_text(json.dumps(spec))
        return bundle

    def attach_block(self, cid: str, mount: dict, pci_address: str, fstype: str) -> None:
        """storage/mod.rs handle_block_device, once the caller hot-plugged the mount's block
        device and QEMU put it at `pci_address` (Kuasar's `0000:<bridge slot>:<slot>.0`)."""
        self._add(cid, mount, need_guest_handle=True, source=pci_address, driver="blk",
                  fstype=fstype, options=_ro(mount.get("options", [])),
                  mount_point=f"{self.guest_storages}/storage{self._last_id + 1}")

    def add_exec_io(self, cid: str, exec_id: str, io: dict) -> None:
        (self.share / cid / f"io-{cid}-{exec_id}").write_text(json.dumps(io))

    def remove_container(self, cid: str) -> None:
        """After containerd's Delete: the container's references go, unused storages with it
        (storage/mod.rs deference_container_storages), then the bundle (spec.rs rollback)."""
        for storage in self.storages:
            storage["ref_container"].pop(cid, None)
        for storage in [s for s in self.storages if not s["ref_container"]]:
            self.storages.remove(storage)
            self._detach(storage["id"])
        shutil.rmtree(self.share / cid, ignore_errors=True)

    def close(self) -> None:
        for storage_id in list(self._host_mounts):
            self._detach(storage_id)

    # -- the handlers -----------------------------------------------------------------------------

    def _namespaces(self, spec: dict, share_pid: bool) -> None:
        linux = spec.setdefault("linux", {})
        kept = []
        for ns in linux.get("namespaces", []):
            if ns["type"] in ("network", "cgroup"):
                continue
            shared = ns["type"] in ("ipc", "uts") or (ns["type"] == "pid" and share_pid)
            kept.append({"type": ns["type"], "path": f"{self.sandbox_ns}/{ns['type']}"}
                        if shared else {"type": ns["type"]})
        linux["namespaces"] = kept

    def _attach(self, cid: str, mount: dict, rootfs: bool) -> None:
        """attach_storage: reuse the volume's storage (not for a rootfs), else make one."""
        if not rootfs:
            for storage in self.storages:
                if _is_for(storage, mount):
                    storage["ref_container"][cid] = storage["ref_container"].get(cid, 0) + 1
                    return
        source, kind, options = mount.get("source", ""), mount.get("type", ""), \
            mount.get("options", [])
        if "kubernetes.io~empty-dir" in source:
            info = _mount_info(source)
            if info and info[1] == "tmpfs" and "kubernetes.io~empty-dir" in info[0]:
                self._add(cid, mount, need_guest_handle=True, source="tmpfs", driver="ephemeral",
                          fstype="tmpfs", options=_ro(options) + [
                              o for o in info[2] if o.startswith("size=") or o in PROPAGATION],
                          mount_point=f"{self.guest_storages}/storage{self._last_id + 1}")
                return
        if kind == "bind" and source and mount.get("destination") == "/dev/shm":
            return
        if (kind == "bind" and source) or kind == "overlay":
            storage_id = f"storage{self._last_id + 1}"
            target = self.share / storage_id
            if kind == "overlay" or Path(source).is_dir():
                target.mkdir()
            else:
                target.touch()
            if kind == "overlay":
                subprocess.run(["mount", "-t", "overlay", source, "-o", ",".join(options),
                                str(target)], check=True)
            else:
                subprocess.run(["mount", "--bind", source, str(target)], check=True)
            self._host_mounts[storage_id] = target
            self._add(cid, mount, need_guest_handle=False, source="", driver="", fstype="bind",
                      options=_ro(options), mount_point=f"{self.guest_share}/{storage_id}")

    def _add(self, cid: str, mount: dict, **fields) -> None:
        self._last_id += 1
        self.storages.append({
            "host_source": mount.get("source", ""), "type": mount.get("type", ""),
            "id": f"storage{self._last_id}", "device_id": None, "ref_container": {cid: 1},
            "driver_options": [], **fields})

    def _use_storages(self, cid: str, spec: dict, rootfs: list[dict]) -> list[dict]:
        """handler/storage.rs: the spec's mounts and root point at the storages; the ones the
        guest must mount are returned."""
        guest = []
        for mount in spec.get("mounts", []):
            storage = next((s for s in self.storages if _is_for(s, mount)), None)
            if storage is not None:
                mount["source"] = storage["mount_point"]
                mount["options"] = mount.get("options", []) + ["bind"]
                if storage["need_guest_handle"] and not any(
                        (g["host_source"], g["type"]) == (storage["host_source"], storage["type"])
                        for g in guest):
                    guest.append(storage)
            if mount.get("type") == "bind" and mount.get("destination") == "/dev/shm":
                mount["source"] = "/dev/shm"
                mount["options"] = mount.get("options", []) + ["rbind"]
        for mount in rootfs:
            storage = [s for s in self.storages if _is_for(s, mount) and cid in s["ref_container"]]
            spec["root"]["path"] = storage[-1]["mount_point"]
            if storage[-1]["need_guest_handle"]:
                guest.append(storage[-1])
        return guest

    def _pod_files(self, spec: dict) -> None:
        """handler/spec.rs container_mounts: the pod's files the spec does not mount yet."""
        taken = {os.path.normpath(m["destination"]) for m in spec.get("mounts", [])}
        mode = "ro" if spec.get("root", {}).get("readonly") else "rw"
        for destination, name in (("/etc/hostname", "hostname"), ("/etc/hosts", "hosts"),
                                  ("/etc/resolv.conf", "resolv.conf")):
            if destination not in taken and (self.share / name).exists():
                spec["mounts"].append({"destination": destination, "type": "bind",
                                       "source": f"{self.guest_share}/{name}",
                                       "options": ["rbind", "rprivate", mode]})

    def _detach(self, storage_id: str) -> None:
        target = self._host_mounts.pop(storage_id, None)
        if target is None:
            return
        subprocess.run(["umount", "-l", str(target)], check=True)
        if target.is_dir():
            target.rmdir()
        else:
            target.unlink()


def overlay_rootfs(lower: Path, snapshot: Path) -> list[dict]:
    """containerd's rootfs mounts for a container: an overlay snapshot of `lower`."""
    (snapshot / "fs").mkdir(parents=True)
    (snapshot / "work").mkdir()
    return [{"type": "overlay", "source": "overlay", "options": [
        f"lowerdir={lower}", f"upperdir={snapshot / 'fs'}", f"workdir={snapshot / 'work'}",
        "index=off"]}]


def _is_for(storage: dict, mount: dict) -> bool:
    return (storage["host_source"], storage["type"]) == (mount.get("source", ""),
                                                         mount.get("type", ""))


def _ro(options: list[str]) -> list[str]:
    return ["ro"] if "ro" in options else []


def _mount_info(path: str) -> tuple[str, str, list[str]] | None:
    """(mount point, fstype, options + propagation) of the mount holding `path`
    (storage/mount.rs get_mount_info)."""
    best = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = fields[4]
        if not (path == point or point == "/" or path.startswith(point + "/")):
            continue
        if best and len(point) <= len(best[0]):
            continue
        separator = fields.index("-")
        options = list(dict.fromkeys(fields[5].split(",") + fields[separator + 3].split(",")))
        optional = fields[6:separator]
        propagation = ("shared" if any(f.startswith("shared:") for f in optional) else
                       "slave" if any(f.startswith("master:") for f in optional) else "private")
        best = (point, fields[separator + 1], options + [propagation])
    return best
