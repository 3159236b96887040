"""vmm-sandboxer (this project) as the node's `vmm` sandbox proxy plugin, in the node's network
namespace, publishing task events to the node's containerd."""
from __future__ import annotations

import json
import os
from pathlib import Path

from host_sandboxer.config import REPO_ROOT
from netns import NodeNetns
from scripts.demo import template_line
from service import Service

# containerd's sandbox IDs are 64 characters and a pod's longest socket is `vhost-vsock.sock`
# (or `vsock.sock_<port>`): <dir>/<id>/<16 characters> must fit in a unix socket path (107 bytes).
LONGEST_POD_SOCKET = 1 + 64 + 1 + len("vhost-vsock.sock")
UNIX_PATH_MAX = 107

CONFIG = """[vm]
kernel = "{kernel}"
initrd = "{initrd}"
rootfs = "{rootfs}"
boot_timeout_s = 120.0
{template}[containerd]
address = "{containerd}"
"""


class Sandboxer:
    def __init__(self, netns: NodeNetns, work: Path, state: Path, containerd_socket: Path, kernel: Path,
                 initrd: Path):
        if len(os.fsencode(state)) + LONGEST_POD_SOCKET > UNIX_PATH_MAX:
            raise ValueError(f"vmm-sandboxer --dir {state} is too long: a pod's sockets would not fit in "
                             f"{UNIX_PATH_MAX} bytes (at most {UNIX_PATH_MAX - LONGEST_POD_SOCKET} characters)")
        self.socket = work / "vmm.sock"
        self.state = state
        config = work / "vmm-sandboxer.toml"
        config.write_text(CONFIG.format(kernel=kernel, initrd=initrd, rootfs=Path(initrd).with_name("rootfs.img"),
                                        containerd=containerd_socket, template=template_line()))
        self.service = Service("vmm-sandboxer", netns.argv(
            str(REPO_ROOT / ".venv" / "bin" / "vmm-sandboxer"), "--listen", str(self.socket),
            "--dir", str(self.state), "--config", str(config)), work / "vmm-sandboxer.log")

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        self.service.start(self.socket.exists, timeout=60)

    def stop(self) -> None:
        """SIGTERM: the graceful stop of an upgrade (the pods run on; a new daemon takes them over)."""
        self.service.stop()

    def kill(self) -> None:
        """kill -9, as a crash ends it (a new daemon on the same --dir re-attaches the pods)."""
        self.service.kill()

    @property
    def pid(self) -> int:
        return self.service.proc.pid

    def relay_pid(self) -> int:
        """The task relay's pid, from the record the daemon keeps in its --dir."""
        return json.loads((self.state / "task-relay.json").read_text())["pid"]
