"""vmm-sandboxer (this project) as the node's `vmm` sandbox proxy plugin, in the node's network
namespace, publishing task events to the node's containerd."""
from __future__ import annotations

from pathlib import Path

from host_sandboxer.config import REPO_ROOT
from netns import NodeNetns
from service import Service

CONFIG = """[vm]
kernel = "{kernel}"
initrd = "{initrd}"
boot_timeout_s = 120.0
[containerd]
address = "{containerd}"
"""


class Sandboxer:
    def __init__(self, netns: NodeNetns, work: Path, containerd_socket: Path, kernel: Path, initrd: Path):
        self.socket = work / "vmm.sock"
        self.state = work / "v"  # short: a pod's unix sockets live under <dir>/<64-char id>/
        config = work / "vmm-sandboxer.toml"
        config.write_text(CONFIG.format(kernel=kernel, initrd=initrd, containerd=containerd_socket))
        self.service = Service("vmm-sandboxer", netns.argv(
            str(REPO_ROOT / ".venv" / "bin" / "vmm-sandboxer"), "--listen", str(self.socket),
            "--dir", str(self.state), "--config", str(config)), work / "vmm-sandboxer.log")

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        self.service.start(self.socket.exists, timeout=60)

    def stop(self) -> None:
        self.service.stop()

    def kill_and_restart(self) -> None:
        """kill -9, then a new daemon on the same --dir (it re-attaches running pods)."""
        self.service.kill()
        self.start()
