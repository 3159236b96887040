"""What the agent reads from, and changes in, OCI specs: the bundle's config.json (process user,
pod namespaces) and the JSON process spec of an Exec."""

import json
import os
from typing import Any, Optional

from .errors import invalid_argument

POD_NAMESPACES = ("ipc", "uts", "pid")


def load_bundle_spec(bundle: str) -> dict:
    if not os.path.isabs(bundle):
        raise invalid_argument(f"bundle {bundle!r} is not an absolute path")
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, "rb") as f:
            spec = json.loads(f.read())
    except FileNotFoundError:
        raise invalid_argument(f"bundle {bundle}: no config.json") from None
    except (OSError, ValueError) as e:
        raise invalid_argument(f"bundle {bundle}: unreadable config.json: {e}") from None
    linux = spec.get("linux", {}) if isinstance(spec, dict) else None
    if not isinstance(spec.get("process", {}) if isinstance(spec, dict) else None, dict) \
            or not isinstance(linux, dict) \
            or not isinstance(linux.get("namespaces", []), list) \
            or not all(isinstance(ns, dict) for ns in linux.get("namespaces", [])):
        raise invalid_argument(f"bundle {bundle}: config.json is not an OCI runtime spec")
    return spec


def save_bundle_spec(bundle: str, spec: dict) -> None:
    path = os.path.join(bundle, "config.json")
    tmp = path + ".vmm-task.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    os.replace(tmp, path)


def absolute_root(spec: dict, bundle: str) -> None:
    """Make the spec's `root.path` absolute (relative paths are the bundle's), so the spec can
    run from another directory than its bundle."""
    root = spec.get("root")
    if not isinstance(root, dict) or not isinstance(root.get("path"), str) or not root["path"]:
        raise invalid_argument(f"bundle {bundle}: config.json has no root.path")
    root["path"] = os.path.join(bundle, root["path"])


def apply_pod_namespaces(spec: dict, pod: dict[str, Optional[str]]) -> bool:
    """Point the spec's ipc/uts (and pid, when the pod shares one) namespaces at the pod's, and
    drop a hostname the pod's UTS namespace already has.
    Returns whether the spec changed. `pod` maps a type to a path (or None: not shared); the
    spec passed load_bundle_spec's shape checks."""
    namespaces = spec.setdefault("linux", {}).setdefault("namespaces", [])
    changed = False
    for kind in POD_NAMESPACES:
        path = pod.get(kind)
        if not path:
            continue
        entries = [ns for ns in namespaces if ns.get("type") == kind]
        if entries == [{"type": kind, "path": path}]:
            continue
        namespaces[:] = [ns for ns in namespaces if not any(ns is e for e in entries)]
        namespaces.append({"type": kind, "path": path})
        changed = True
    if pod.get("uts") and "hostname" in spec:
        # the pod's UTS namespace carries the pod's hostname (SetupSandbox): a container setting
        # its own there would rename the whole pod
        del spec["hostname"]
        changed = True
    return changed


def add_pod_files(spec: dict, files: dict[str, str]) -> bool:
    """Bind the pod's files (destination -> path: /etc/hosts, /etc/resolv.conf from
    SetupSandbox) read-only into the container, unless its spec mounts that destination already
    (CRI's own mounts, rewritten by the host, win). Returns whether the spec changed."""
    mounts = spec.setdefault("mounts", [])
    if not isinstance(mounts, list):
        raise invalid_argument("config.json: mounts is not a list")
    taken = {m.get("destination") for m in mounts if isinstance(m, dict)}
    added = [{"destination": dest, "type": "bind", "source": path, "options": ["rbind", "ro"]}
             for dest, path in sorted(files.items()) if dest not in taken]
    mounts.extend(added)
    return bool(added)


def process_owner(process: Any, what: str) -> tuple[int, int]:
    """(uid, gid) a process spec runs as; pipes are handed to it with that owner."""
    user = process.get("user") if isinstance(process, dict) else None
    if not isinstance(user, dict):
        return 0, 0
    uid, gid = user.get("uid", 0), user.get("gid", 0)
    if not all(isinstance(v, int) and 0 <= v < 2**32 for v in (uid, gid)):
        raise invalid_argument(f"{what}: process user {user!r}: uid/gid must be integers")
    return uid, gid


def parse_exec_process(raw: bytes, what: str) -> dict:
    """The Exec request's spec Any holds the OCI process as JSON (containerd's typeurl for
    specs.Process)."""
    try:
        process = json.loads(raw)
    except ValueError as e:
        raise invalid_argument(f"{what}: the spec is not a JSON OCI process: {e}") from None
    if not isinstance(process, dict) or not isinstance(process.get("args"), list) \
            or not process["args"]:
        raise invalid_argument(f"{what}: the spec needs an OCI process with non-empty args")
    return process
