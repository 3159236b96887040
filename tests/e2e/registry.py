"""A local image registry (Debian's docker-registry) on 127.0.0.1:5000 inside the node's network
namespace, and skopeo pushing OCI layouts into it."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from netns import NodeNetns
from oci_image import write_layout
from service import Service
from stand_in_images import StandIn

ADDRESS = "127.0.0.1:5000"
CONFIG = """version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: {address}
"""
# skopeo refuses to copy without a signature policy; the images are the test's own.
POLICY = {"default": [{"type": "insecureAcceptAnything"}]}


class LocalRegistry:
    def __init__(self, netns: NodeNetns, work: Path):
        self.netns, self.work = netns, work
        config = work / "registry.yml"
        config.write_text(CONFIG.format(root=work / "registry", address=ADDRESS))
        self.policy = work / "skopeo-policy.json"
        self.policy.write_text(json.dumps(POLICY))
        self.service = Service("docker-registry", netns.argv("docker-registry", "serve", str(config)),
                               work / "registry.log")

    def start(self) -> None:
        self.service.start(self._answers)

    def stop(self) -> None:
        self.service.stop()

    def _answers(self) -> bool:
        try:
            self.netns.fetch(f"http://{ADDRESS}/v2/", timeout=2)
            return True
        except subprocess.CalledProcessError:
            return False

    def push(self, image: StandIn) -> None:
        """Build the stand-in as an OCI layout and copy it into the registry."""
        layout = self.work / "layouts" / image.registry_path.replace("/", "_").replace(":", "_")
        write_layout(image.definition, layout, "latest")
        subprocess.run(self.netns.argv("skopeo", "copy", "--quiet", "--policy", str(self.policy),
                                       "--dest-tls-verify=false", f"oci:{layout}:latest",
                                       f"docker://{ADDRESS}/{image.registry_path}"),
                       check=True, capture_output=True, timeout=120)
