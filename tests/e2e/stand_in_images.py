"""The images the e2e layer serves from its local registry, all built from static busybox under
the names a node (and critest) asks for, so nothing is ever pulled from the Internet:

- critest's defaults: `registry.k8s.io/e2e-test-images/busybox:1.29-2`, `.../nginx:1.14-2` and
  `.../httpd:2.4.39-4` (busybox httpd on port 80 stands in for both web servers);
- containerd 2.4's pause image `registry.k8s.io/pause:3.10.2` (internal/cri/config's
  DefaultSandboxImage), which the runc baseline runs as each pod's sandbox container. A pause
  only has to live until CRI SIGKILLs it (podsandbox/sandbox_stop.go): `sleep infinity`.
"""
from __future__ import annotations

from dataclasses import dataclass

from oci_image import ImageDefinition

WEB_PAGE = b"<html><body><h1>Welcome to nginx!</h1><p>vmm-task e2e stand-in</p></body></html>\n"


@dataclass(frozen=True)
class StandIn:
    name: str  # what a node asks for: registry host / repository : tag
    definition: ImageDefinition

    @property
    def registry_path(self) -> str:
        """The repository:tag under the registry host (what the mirror serves)."""
        return self.name.split("/", 1)[1]


def web_server(name: str, script: str, docroot: str, first: str) -> StandIn:
    """busybox httpd on port 80 in the foreground, serving WEB_PAGE, after a `first` line of sh."""
    entrypoint = f"#!/bin/sh\n{first}\nexec httpd -f -p 80 -h /{docroot}\n".encode()
    return StandIn(name, ImageDefinition(cmd=(f"/{script}",), exposed_ports=(80,), files={
        script: entrypoint, f"{docroot}/index.html": WEB_PAGE}))


BUSYBOX = StandIn("registry.k8s.io/e2e-test-images/busybox:1.29-2", ImageDefinition(cmd=("sh",)))
# critest's HostPID spec reads nginx's pid file; its multi-container spec looks for "httpd" in the log
WEB_SERVER = web_server("registry.k8s.io/e2e-test-images/nginx:1.14-2", "docker-entrypoint.sh",
                        "usr/share/nginx/html", "echo $$ > /var/run/nginx.pid")
HTTPD = web_server("registry.k8s.io/e2e-test-images/httpd:2.4.39-4", "usr/local/bin/httpd-foreground",
                   "usr/local/apache2/htdocs", 'echo "httpd stand-in (busybox) on port 80"')
PAUSE = StandIn("registry.k8s.io/pause:3.10.2", ImageDefinition(entrypoint=("/bin/sleep",),
                                                                 cmd=("infinity",)))
ALL = (BUSYBOX, WEB_SERVER, HTTPD, PAUSE)
MIRRORED_HOSTS = ("registry.k8s.io", "gcr.io")


def critest_images_yaml() -> str:
    """critest's --test-images-file (pkg/framework/test_context.go's TestImageList)."""
    return (f"defaultTestContainerImage: {BUSYBOX.name}\n"
            f"webServerTestImage: {WEB_SERVER.name}\n")
