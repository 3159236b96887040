"""Kuasar's bundle convention: its host prepares each container in the shared directory, and the
Task requests (sent by containerd itself) carry containerd's host paths, which the guest ignores
(vmm/task/src/container.rs, KuasarFactory::create):

- `<share>/<id>/config.json` (vmm/sandbox/src/container/handler/spec.rs): the spec, whose
  `root.path` is already the rootfs the host mounted into the shared directory
  (handler/storage.rs), with the pod's namespaces at /run/sandbox-ns/<type> (handler/ns.rs);
  the request's `bundle` and `rootfs` are containerd's;
- `<share>/<id>/io-<id>` and `io-<id>-<exec-id>` (handler/io.rs, handler/process.rs): JSON
  {stdin, stdout, stderr, terminal} replacing the request's stdio (containerd's FIFOs), each a
  virtio-serial port name (virtio_ports.py) or a `scheme://` address; an exec's file is read
  once and removed, as the guest there does (vmm/task/src/util.rs, read_io);
- the spec annotation `io.kuasar.storages`, else `<share>/<id>/storage-<id>`
  (handler/storage.rs): the volumes the guest mounts itself (storages.py).

Our host rewrites the requests instead (host_sandboxer/taskproxy): its `bundle` is the shared
bundle itself, so a request follows Kuasar's convention exactly when the shared directory holds
a bundle for its container and the request names another one.
"""

import json
import os
from typing import Optional

from vmm_task.container.errors import invalid_argument
from vmm_task.container.spec import load_bundle_spec
from vmm_task.container.stdio import Stdio

from .storages import Storage, parse_storages

STORAGES_ANNOTATION = "io.kuasar.storages"


def shared_bundle(state_dir: str, cid: str, request_bundle: str) -> Optional[str]:
    """The host's bundle for `cid` in the shared directory if the request follows Kuasar's
    convention, else None (`cid` is a checked container ID)."""
    bundle = os.path.normpath(os.path.join(state_dir, cid))
    if request_bundle and os.path.normpath(request_bundle) == bundle:
        return None
    return bundle if os.path.isfile(os.path.join(bundle, "config.json")) else None


def init_stdio(bundle: str, cid: str, request: Stdio) -> Stdio:
    """The init process's stdio: the io file's if the host wrote one, else the request's."""
    io = _read_io(os.path.join(bundle, f"io-{cid}"))
    return request if io is None else io


def exec_stdio(bundle: str, cid: str, exec_id: str, request: Stdio) -> Stdio:
    """An exec's stdio: its io file's (then removed), else the request's; the terminal is the
    request's either way."""
    path = os.path.join(bundle, f"io-{cid}-{exec_id}")
    io = _read_io(path)
    if io is None:
        return request
    try:
        os.unlink(path)
    except OSError:
        pass  # a read-only share: the file is the host's to remove
    return io._replace(terminal=request.terminal)


def _read_io(path: str) -> Optional[Stdio]:
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise invalid_argument(f"{path}: unreadable io file: {e}") from None
    if not isinstance(raw, dict):
        raise invalid_argument(f"{path}: the io file must hold a JSON object")
    streams = [raw.get(name) or "" for name in ("stdin", "stdout", "stderr")]
    terminal = raw.get("terminal", False)
    if not all(isinstance(s, str) for s in streams) or not isinstance(terminal, bool):
        raise invalid_argument(f"{path}: stdin/stdout/stderr must be strings and terminal a "
                               "boolean")
    return Stdio(*streams, terminal)


def storages(bundle: str, cid: str) -> list[Storage]:
    """The storages the guest must mount for the container (none if the host named none)."""
    annotations = load_bundle_spec(bundle).get("annotations")
    if isinstance(annotations, dict) and STORAGES_ANNOTATION in annotations:
        text = annotations[STORAGES_ANNOTATION]
        if not isinstance(text, str):
            raise invalid_argument(f"bundle {bundle}: annotation {STORAGES_ANNOTATION} is not "
                                   "a string")
        return parse_storages(text, f"bundle {bundle}: annotation {STORAGES_ANNOTATION}")
    path = os.path.join(bundle, f"storage-{cid}")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_storages(f.read(), path)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise invalid_argument(f"{path}: unreadable storage file: {e}") from None
