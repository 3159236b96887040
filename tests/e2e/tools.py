"""Where the e2e layer finds the real node software, and what is missing.

containerd 2.4, its runc shim, runc, crictl and critest are upstream binaries that Debian 12 does
not package at these versions: they come from the directory VMM_TASK_CONTAINERD_BIN names (the
Makefile points it at ../shared/containerd/bin when that exists), else from PATH. The rest is
Debian's (scripts/apt-packages.txt): CNI plugins, a registry, skopeo, nsenter, static busybox.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

BIN_VARIABLE = "VMM_TASK_CONTAINERD_BIN"
UPSTREAM = ("containerd", "containerd-shim-runc-v2", "runc", "crictl")
CNI_DIR = Path("/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "loopback")
DEBIAN = ("docker-registry", "skopeo", "nsenter", "ip")
BUSYBOX = Path("/bin/busybox")  # busybox-static: the images' only binary


def upstream_bin_dir() -> Path | None:
    """The directory holding containerd (the variable's, else the one on PATH)."""
    configured = os.environ.get(BIN_VARIABLE)
    if configured:
        return Path(configured)
    found = shutil.which("containerd")
    return Path(found).parent if found else None


def upstream(name: str) -> Path:
    """Path of an upstream binary (containerd, crictl, critest, ...)."""
    directory = upstream_bin_dir()
    return (directory / name) if directory else Path(shutil.which(name) or name)


def missing(extra_upstream: tuple[str, ...] = ()) -> list[str]:
    """Everything the e2e layer needs and cannot find, each named with where it was looked for."""
    directory = upstream_bin_dir()
    where = f"{BIN_VARIABLE}={os.environ[BIN_VARIABLE]}" if os.environ.get(BIN_VARIABLE) else "PATH"
    absent = [f"{name} (in {where})" for name in UPSTREAM + extra_upstream
              if directory is None or not os.access(directory / name, os.X_OK)]
    absent += [f"{CNI_DIR / name} (containernetworking-plugins)" for name in CNI_PLUGINS
               if not (CNI_DIR / name).is_file()]
    absent += [name for name in DEBIAN if shutil.which(name) is None]
    if not BUSYBOX.is_file():
        absent.append(f"{BUSYBOX} (busybox-static)")
    return absent


def skip_reason(extra_upstream: tuple[str, ...] = ()) -> str | None:
    """One line naming what is missing, or None when everything is there."""
    absent = missing(extra_upstream)
    if not absent:
        return None
    return (f"e2e: missing {', '.join(absent)}; set {BIN_VARIABLE} to the directory of the upstream "
            f"binaries (../shared/containerd/bin) and run `make setup`")
