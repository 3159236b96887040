"""virtiofsd serving one VM's shared directory: QEMU 7.2's C daemon (/usr/lib/qemu/virtiofsd,
Debian 12) or the Rust one (/usr/libexec/virtiofsd, Debian 13), which takes the same `-o`
options (deprecated there, with a warning).

It must listen before QEMU starts (QEMU connects to its vhost-user socket at start-up) and it
exits by itself when QEMU disconnects.  Options used: `--socket-path`, `-o source=`, `-o cache=`
(auto|always|none); its default sandbox (mount/pid/net namespaces + pivot_root into the shared
directory) needs root, which the daemon is.  It keeps a lock file `/run/virtiofsd/<socket path
with / as .>.pid` that it does not remove on SIGTERM; `stop()` removes it.

It starts with CAPABILITIES only (and no_new_privs): what its sandbox needs, then what serving
files of every owner needs, to which it drops itself (capng) once its sandbox is made, adding
seccomp; measured: without setpcap it exits silently when it drops the others.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

from host_sandboxer.containment.launch import Confinement
from host_sandboxer.vmm import process
from host_sandboxer.vmm.helper_output import HelperOutput

PID_DIR = Path("/run/virtiofsd")
CAPABILITIES = ("sys_admin",  # unshare, mount, pivot_root: its sandbox
                "sys_resource",  # its RLIMIT_NOFILE raised (one O_PATH fd per inode the guest holds)
                "setpcap",  # its capabilities dropped to those below, bounding set included
                "chown", "dac_override", "fowner", "fsetid", "setgid", "setuid", "mknod", "setfcap")


class VirtiofsdError(RuntimeError):
    pass


class Virtiofsd:
    def __init__(self, binary: Path, source: Path, socket_path: Path, output: Path, cache: str = "auto"):
        self.argv = [str(binary), f"--socket-path={socket_path}", "-o", f"source={source}", "-o", f"cache={cache}"]
        self.binary = binary
        self.source = source
        self.socket_path = socket_path
        self.output = HelperOutput(output)
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, cgroup_procs: tuple[str, ...] = (), die_with_us: bool = True,
                    timeout_s: float = 5.0, mount_namespace: str | None = None) -> None:
        """Spawn virtiofsd (joining `cgroup_procs`) and return once its socket exists; raise
        VirtiofsdError if it fails. `die_with_us=False`: it outlives this process (a daemon's
        pod; see process.py). `mount_namespace`: where the source's mounts are."""
        if not self.binary.is_file():
            raise VirtiofsdError(f"virtiofsd not found at {self.binary}")
        if not self.source.is_dir():
            raise VirtiofsdError(f"shared directory {self.source} is not a directory")
        self.socket_path.unlink(missing_ok=True)
        self.proc = await process.spawn(self.argv, self.output, confinement=Confinement(
            cgroup_procs=cgroup_procs, capabilities=CAPABILITIES, no_new_privs=True, die_with_us=die_with_us,
            mount_namespace=mount_namespace))
        deadline = time.monotonic() + timeout_s
        while not self.socket_path.exists():
            if self.proc.returncode is not None or time.monotonic() > deadline:
                why = process.describe_exit(self.proc.returncode) if self.proc.returncode is not None \
                    else f"no socket after {timeout_s:.0f} s"
                await self.stop()
                raise VirtiofsdError(f"virtiofsd {why}: {self.output.tail()}")
            await asyncio.sleep(0.005)

    def adopt(self, record: dict | None) -> bool:
        """Take over the virtiofsd an earlier daemon started (`record`: process.identity());
        False if it is gone."""
        self.proc = process.adopt(record, self.output)
        return self.proc is not None

    async def ended(self) -> str:
        """Wait for virtiofsd to end (spawned or adopted alike); how it ended, in words. While
        the VM runs this is a fault: the guest's shared directory (the containers' rootfs) is gone."""
        await self.proc.wait()
        return process.describe_end(self.proc)

    async def stop(self) -> None:
        if self.proc is not None:
            await process.stop(self.proc)
        self.output.close()
        self.socket_path.unlink(missing_ok=True)
        (PID_DIR / (str(self.socket_path).replace("/", ".") + ".pid")).unlink(missing_ok=True)
