#!/usr/bin/env python3
"""Generate Python from proto/ into vmm_common/protos/ (`make protos`).

`proto/X/Y/z.proto` becomes `vmm_common.protos.X.Y.z_pb2` (and `z_pb2_grpc` for the
few services the host speaks over gRPC). protoc emits top-level imports such as
`from containerd.types import mount_pb2`; those are rewritten to the package so the
generated code needs nothing on sys.path and never shadows installed packages.
A stamp holding the hash of every input makes a second run a no-op.
"""
import fcntl
import hashlib
import importlib.metadata
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "vmm_common" / "protos"
PACKAGE = "vmm_common.protos"
STAMP = OUT_DIR / ".stamp"
# Services reached over gRPC by (or from) the host daemon; everything else is ttrpc-only
# and needs no grpcio stubs.
GRPC_PROTOS = (
    "containerd/services/sandbox/v1/sandbox.proto",
    "containerd/task/v3/shim.proto",
    "containerd/services/events/v1/events.proto",
)


def proto_files() -> list[str]:
    return sorted(p.relative_to(PROTO_DIR).as_posix() for p in PROTO_DIR.rglob("*.proto"))


def inputs_hash(protos: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update(Path(__file__).read_bytes())
    digest.update(importlib.metadata.version("grpcio-tools").encode())
    for rel in protos:
        digest.update(rel.encode() + b"\0" + (PROTO_DIR / rel).read_bytes() + b"\0")
    return digest.hexdigest()


def run_protoc(protos: list[str], out: Path) -> None:
    from importlib.resources import files

    from grpc_tools import protoc

    well_known = str(files("grpc_tools") / "_proto")
    base = ["protoc", f"-I{PROTO_DIR}", f"-I{well_known}"]
    if protoc.main(base + [f"--python_out={out}", *protos]) != 0:
        sys.exit("genproto: protoc failed (python)")
    if protoc.main(base + [f"--grpc_python_out={out}", *GRPC_PROTOS]) != 0:
        sys.exit("genproto: protoc failed (grpc)")


def rewrite_imports(out: Path, protos: list[str]) -> None:
    """Point imports of our own generated modules at the package."""
    ours = {str(Path(rel).parent).replace("/", ".") for rel in protos}
    pattern = re.compile(r"^from ([\w.]+) import (\w+_pb2)", re.M)

    def fix(m: re.Match) -> str:
        module = m.group(1)
        if module in ours:
            return f"from {PACKAGE}.{module} import {m.group(2)}"
        return m.group(0)

    for path in out.rglob("*.py"):
        path.write_text(pattern.sub(fix, path.read_text()))


def add_init_files(out: Path) -> None:
    for directory in [out, *(d for d in out.rglob("*") if d.is_dir())]:
        (directory / "__init__.py").touch()


def install(out: Path) -> None:
    """Replace the generated tree (keeping the committed top-level __init__.py)."""
    for child in OUT_DIR.iterdir():
        if child.name in ("__init__.py", ".lock"):
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    for child in out.iterdir():
        if child.name != "__init__.py":
            shutil.move(str(child), OUT_DIR / child.name)


def up_to_date(protos: list[str], digest: str) -> bool:
    """The stamp matches and no generated module has been removed since (make clean)."""
    if not STAMP.exists() or STAMP.read_text().strip() != digest:
        return False
    return all((OUT_DIR / rel).with_name(Path(rel).stem + "_pb2.py").exists() for rel in protos)


def main() -> int:
    protos = proto_files()
    digest = inputs_hash(protos)
    if up_to_date(protos, digest):
        return 0
    # Several engineers (or make -j) may run this at once: one generates, the others wait.
    with open(OUT_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if up_to_date(protos, digest):
            return 0
        with tempfile.TemporaryDirectory(prefix="genproto-") as tmp:
            out = Path(tmp)
            run_protoc(protos, out)
            rewrite_imports(out, protos)
            add_init_files(out)
            install(out)
        STAMP.write_text(digest + "\n")
    print(f"genproto: {len(protos)} protos -> {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
