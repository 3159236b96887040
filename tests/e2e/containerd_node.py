"""containerd 2.4 as a node runs it, but everything in the test's directory: its own config
(version 3), root, state, sockets, shim sockets, CNI config, registry mirrors; inside the node's
network namespace; three CRI runtime handlers side by side:

- `runc`: containerd's own runtime (containerd-shim-runc-v2 + runc from the upstream binaries
  directory, first in containerd's PATH), the baseline;
- `vmm`: this project, the `type = "sandbox"` proxy plugin served by vmm-sandboxer (README's
  containerd section), with `disable_pause_image_pull` (new in 2.4: no pause image for a
  sandboxer that does not run one);
- `vmm-streaming`: the same sandboxer with `io_type = "streaming"`: containerd opens its Streaming
  service on the pod's task address for each stdio stream instead of making FIFOs.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import stand_in_images
import tools
from netns import NodeNetns
from registry import ADDRESS as REGISTRY_ADDRESS
from service import Service

POD_SUBNET = "192.0.2.0/24"  # TEST-NET-1, only inside the node's namespace
BRIDGE_GATEWAY = "192.0.2.1"

CONFIG = """version = 3
root = "{root}"
state = "{state}"
imports = []
disabled_plugins = ["io.containerd.nri.v1.nri"]

[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{work}/opt"
[plugins."io.containerd.shim.v1.manager"]
  socket_dir = "{work}/s"

[plugins."io.containerd.cri.v1.images".registry]
  config_path = "{certs}"

[plugins."io.containerd.cri.v1.runtime"]
  # no CAP_SYS_RESOURCE here: runc could not give the pause container oom_score_adj -998
  restrict_oom_score_adj = true
  # pod network namespaces under containerd's state dir: in the test's directory, not /run/netns
  netns_mounts_under_state_dir = true

[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = ["{cni_bin}"]
  conf_dir = "{cni_conf}"

[plugins."io.containerd.cri.v1.runtime".containerd]
  default_runtime_name = "runc"

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
  BinaryName = "{runc}"

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.vmm]
  runtime_type = "io.containerd.runc.v2"   # containerd requires a value; the sandboxer serves the task API
  sandboxer = "vmm"
  io_type = "fifo"
  disable_pause_image_pull = true

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.vmm-streaming]
  runtime_type = "io.containerd.runc.v2"
  sandboxer = "vmm"
  io_type = "streaming"
  disable_pause_image_pull = true

[proxy_plugins.vmm]
  type = "sandbox"
  address = "{sandboxer_socket}"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""

HOSTS_TOML = """server = "https://{host}"

[host."http://{registry}"]
  capabilities = ["pull", "resolve"]
"""


def cni_conflist(work: Path) -> dict:
    """A bridge network on TEST-NET-1 (Debian's plugins); IPAM state in the test's directory."""
    return {"cniVersion": "1.0.0", "name": "vmm-e2e", "plugins": [
        {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET, "gateway": BRIDGE_GATEWAY}]],
                  "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(work / "cni-ipam")}},
        {"type": "loopback"}]}


class Containerd:
    def __init__(self, netns: NodeNetns, work: Path, sandboxer_socket: Path):
        self.netns, self.work = netns, work
        self.socket = work / "containerd.sock"
        self.state = work / "state"
        self.config = work / "containerd.toml"
        certs, cni_conf = work / "certs.d", work / "cni"
        for host in stand_in_images.MIRRORED_HOSTS:
            (certs / host).mkdir(parents=True)
            (certs / host / "hosts.toml").write_text(HOSTS_TOML.format(host=host, registry=REGISTRY_ADDRESS))
        cni_conf.mkdir()
        (cni_conf / "10-vmm-e2e.conflist").write_text(json.dumps(cni_conflist(work), indent=1))
        self.config.write_text(CONFIG.format(
            root=work / "root", state=self.state, socket=self.socket, work=work, certs=certs,
            cni_bin=tools.CNI_DIR, cni_conf=cni_conf, runc=tools.upstream("runc"),
            sandboxer_socket=sandboxer_socket))
        env = dict(os.environ, PATH=f"{tools.upstream_bin_dir()}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        self.service = Service("containerd", netns.argv(str(tools.upstream("containerd")), "--config",
                                                        str(self.config), "--log-level", "info"),
                               work / "containerd.log", env=env)

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 60.0) -> None:
        self.service.start(self.serves_cri, timeout=timeout)

    def launch(self) -> None:
        """Start without waiting for CRI (which a restart scenario waits for later)."""
        self.service.start(lambda: True)

    def stop(self) -> None:
        self.service.stop()

    def serves_cri(self) -> bool:
        """CRI answers `crictl info` with the runtime and the network ready (it answers "server
        is not initialized yet" until it has recovered every pod)."""
        if not self.socket.exists():
            return False
        info = subprocess.run([str(tools.upstream("crictl")), "--runtime-endpoint", self.endpoint,
                               "--timeout", "2s", "info"], capture_output=True, text=True)
        if info.returncode != 0:
            return False
        conditions = json.loads(info.stdout).get("status", {}).get("conditions", [])
        ready = {c.get("type") for c in conditions if c.get("status")}
        return {"RuntimeReady", "NetworkReady"} <= ready
