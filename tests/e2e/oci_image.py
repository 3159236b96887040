"""An OCI image layout written by Python: one gzip layer of static busybox with its applet links
(plus any files an image adds), an image config and a manifest, tagged in `index.json`.

Deterministic (fixed mtimes and owners), so the same definition gives the same digests.
skopeo copies the layout (`oci:DIR`) into a registry.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from tools import BUSYBOX

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DIRECTORIES = {"bin": 0o755, "sbin": 0o755, "usr": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755,
               "etc": 0o755, "root": 0o700, "home": 0o755, "tmp": 0o1777, "var": 0o755,
               "var/run": 0o755, "proc": 0o755, "sys": 0o755, "dev": 0o755}
BASE_FILES = {
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n",
    "etc/group": b"root:x:0:\nnobody:x:65534:\n",
}
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass(frozen=True)
class ImageDefinition:
    """What an image holds beyond busybox, and how it runs."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ("sh",)
    files: dict[str, bytes] = field(default_factory=dict)  # path in the image -> content
    exposed_ports: tuple[int, ...] = ()


def applets() -> list[str]:
    """Paths (relative, e.g. `usr/bin/env`) of every applet the static busybox provides."""
    listed = subprocess.run([str(BUSYBOX), "--list-full"], check=True, capture_output=True,
                            text=True).stdout.split()
    return sorted(path for path in listed if path != "bin/busybox")


def layer_tar(definition: ImageDefinition) -> bytes:
    """The uncompressed layer: directories, /bin/busybox, applet symlinks, the image's files."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, kind: bytes, mode: int, data: bytes = b"", target: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.size, info.linkname = kind, mode, len(data), target
            tar.addfile(info, io.BytesIO(data) if data else None)

        files = {**BASE_FILES, **definition.files}
        directories = dict(DIRECTORIES)
        for path in files:
            parent = Path(path).parent
            while str(parent) != ".":
                directories.setdefault(str(parent), 0o755)
                parent = parent.parent
        for name in sorted(directories):
            add(name, tarfile.DIRTYPE, directories[name])
        add("bin/busybox", tarfile.REGTYPE, 0o755, BUSYBOX.read_bytes())
        for path in applets():
            if path not in files:
                add(path, tarfile.SYMTYPE, 0o777, target="/bin/busybox")
        for path, data in sorted(files.items()):
            add(path, tarfile.REGTYPE, 0o755 if data.startswith(b"#!") else 0o644, data)
    return out.getvalue()


def write_layout(definition: ImageDefinition, directory: Path, tag: str) -> str:
    """Write the image as an OCI layout in `directory` with `tag`; return the manifest digest."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def blob(data: bytes, media_type: str) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    tar = layer_tar(definition)
    layer = blob(gzip.compress(tar, mtime=0), MEDIA_LAYER)
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Env": [PATH_ENV], "Entrypoint": list(definition.entrypoint) or None,
                   "Cmd": list(definition.cmd) or None, "WorkingDir": "/",
                   "ExposedPorts": {f"{port}/tcp": {} for port in definition.exposed_ports} or None},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(tar).hexdigest()}"]},
        "history": [{"created_by": "tests/e2e/oci_image.py: static busybox"}],
    }
    config["config"] = {key: value for key, value in config["config"].items() if value is not None}
    manifest = {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
                "config": blob(json.dumps(config, sort_keys=True).encode(), MEDIA_CONFIG),
                "layers": [layer]}
    descriptor = blob(json.dumps(manifest, sort_keys=True).encode(), MEDIA_MANIFEST)
    descriptor["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (directory / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (directory / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [descriptor]}))
    return descriptor["digest"]
