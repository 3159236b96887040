"""The whole e2e node, brought up once and shared: a network namespace of its own, a local
registry holding the stand-in images, containerd 2.4 with the `runc` and `vmm` runtime handlers,
vmm-sandboxer, and crictl pointed at them. Pods get the cgroup parent `/<netns name>`
(`e2e-<run token>-...`): the leak guard knows runc's containers by it, and it goes with the node. A CRI conformance run (critest) can reuse it as it is:
`endpoint` plus `images_file` are what critest takes.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import stand_in_images
from containerd_node import Containerd
from crictl import Crictl
from host_sandboxer.config import DEFAULT_IMAGE_DIR
from host_sandboxer.taskproxy.mounts import unmount_all_under
from host_sandboxer.vmm.process import kill_strays
from host_sandboxer.vmm.template import TemplateStore
from netns import NodeNetns
from registry import LocalRegistry
from sandboxer import Sandboxer


@dataclass
class Node:
    work: Path
    sandboxer_dir: Path  # vmm-sandboxer's --dir
    netns: NodeNetns
    registry: LocalRegistry
    containerd: Containerd
    sandboxer: Sandboxer
    crictl: Crictl
    images_file: Path  # critest's --test-images-file

    @property
    def endpoint(self) -> str:
        return self.containerd.endpoint


@contextlib.contextmanager
def node_environment(kernel: Path = DEFAULT_IMAGE_DIR / "kernel",
                     initrd: Path = DEFAULT_IMAGE_DIR / "initrd.img") -> Iterator[Node]:
    """Bring the node up; on exit remove every pod and take everything down."""
    work = Path(tempfile.mkdtemp(prefix="e2e-"))  # short: containerd's shim sockets live in it
    # as short as a temp dir gets: vmm-sandboxer's pod sockets are <dir>/<64-char id>/<name>
    sandboxer_dir = Path(tempfile.mkdtemp(prefix=""))
    with contextlib.ExitStack() as stack:
        for directory in (work, sandboxer_dir):
            stack.callback(shutil.rmtree, directory, ignore_errors=True)
            stack.callback(unmount_all_under, directory)
            stack.callback(kill_strays, directory)  # shims and VMs that outlived a failed teardown
        # [vm] template (VMM_TASK_TEST_TEMPLATE=1): the templates' RAM outlives the daemon by design.
        stack.callback(shutil.rmtree, TemplateStore(sandboxer_dir).ram_dir, ignore_errors=True)
        if os.environ.get("VMM_TASK_E2E_LOGS"):  # keep the daemons' logs of a run for a post-mortem
            stack.callback(keep_logs, work, Path(os.environ["VMM_TASK_E2E_LOGS"]))
        netns = stack.enter_context(NodeNetns())
        registry = LocalRegistry(netns, work)
        registry.start()
        stack.callback(registry.stop)
        for image in stand_in_images.ALL:
            registry.push(image)
        sandboxer = Sandboxer(netns, work, sandboxer_dir, work / "containerd.sock", kernel, initrd)
        containerd = Containerd(netns, work, sandboxer.socket)
        containerd.start()
        stack.callback(containerd.stop)
        sandboxer.start()
        stack.callback(sandboxer.stop)
        cgroup_parent = f"/{netns.name}"
        stack.callback(remove_cgroups, cgroup_parent)
        crictl = Crictl(netns, containerd.endpoint, work, cgroup_parent)
        stack.callback(remove_all_pods, crictl)
        for image in stand_in_images.ALL:
            crictl.pull(image.name)
        images_file = work / "test-images.yaml"
        images_file.write_text(stand_in_images.critest_images_yaml())
        yield Node(work, sandboxer_dir, netns, registry, containerd, sandboxer, crictl, images_file)


def keep_logs(work: Path, into: Path) -> None:
    """Copy the node's logs (containerd, vmm-sandboxer, the registry) to `into`/<work's name>."""
    kept = into / work.name
    kept.mkdir(parents=True, exist_ok=True)
    for log in work.glob("*.log"):
        shutil.copy2(log, kept)


def remove_cgroups(parent: str, root: Path = Path("/sys/fs/cgroup")) -> None:
    """Take away the pods' parent cgroup (runc leaves it) in every hierarchy, deepest first; one
    that still holds a process stays (the leak guard reports the process)."""
    for top in [root / parent.lstrip("/"), *root.glob(f"*/{parent.lstrip('/')}")]:
        if top.is_dir():
            for directory in sorted((d for d in top.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)) + [top]:
                with contextlib.suppress(OSError):
                    directory.rmdir()


def remove_all_pods(crictl: Crictl) -> None:
    """What a drained node does: stop and remove every pod (and so its containers)."""
    with contextlib.suppress(subprocess.SubprocessError):
        crictl.run("rmp", "--all", "--force", check=False)
