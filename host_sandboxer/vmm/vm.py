"""One guest VM as the daemon, `vmm-sandboxer check` and the VM tests use it.

`GuestVm.start()` brings up, in order, the vsock transport (it must listen before QEMU starts),
the shared-directory server (virtiofsd; 9p needs none), then QEMU, and waits for the agent's
"vmm-task ready" console line; given the daemon's template store ([vm] template), it restores
the VM from a template instead (vmm/clone.py).  Any failure tears down what was started and
raises `VmError` whose `stage` says what failed and whose message ends with the console tail.
All sockets and logs live in `run_dir` (0700).

A VM given the daemon's `vsock_backend` (the daemon's pods) is detached: it outlives the
process that started it. QEMU and virtiofsd are not tied to our life, hybrid vsock is served by
the backend process, and `record()` says what `GuestVm.attach()` needs to take the running VM
over after a restart. Otherwise every helper dies with us (`vmm-sandboxer check`, tests).

Confinement (docs/security.md): QEMU and virtiofsd join the pod's `cgroup` before they exec;
QEMU runs with no capabilities and no_new_privs, with its seccomp filter
(`containment.seccomp`), and as `vmm_uid` when given: every socket it uses is handed to it
open (qemu_fds.py), so it needs no right on the pod's directory. QEMU serving 9p stays root
with the file capabilities 9p needs: it opens the shared files itself, as the guest's users.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

from host_sandboxer.config import Config, boot_image
from host_sandboxer.containment.cgroups import Cgroup
from host_sandboxer.containment.launch import NO_CAPABILITIES, Confinement
from host_sandboxer.vmm import process
from host_sandboxer.vmm.accel import HostFacts, resolve_accel
from host_sandboxer.vmm.cmdline import NinePShare, PmemRoot, TapNic, VirtiofsShare, VmSpec
from host_sandboxer.vmm.qemu import Qemu, QemuError
from host_sandboxer.vmm.qemu_fds import QemuFds
from host_sandboxer.vmm.template import TemplateStore
from host_sandboxer.vmm.virtiofsd import Virtiofsd, VirtiofsdError
from host_sandboxer.vmm.vsock_backend import BackendVsock, VsockBackend, VsockBackendError

READY_LINE = "vmm-task ready"
# A template's agent parameters (clonable_spec; bench.template_trial boots its templates with them):
# its share is virtiofs, and it imports before ready what a pod's start imports (task.preload).
TEMPLATE_PARAMS = ("task.sharefs_type=virtiofs", "task.preload")
KERNEL_INIT_LINE = "Run /init as init process"
UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL
_REPORTED = re.compile(r"\b(\w+)=(\d+(?:\.\d+)?)")  # key=number, any unit suffix ignored
KVM_DEVICE = Path("/dev/kvm")
# QEMU's 9p server (security_model=none) reads, writes, chowns and mknods the guest's files.
NINE_P_CAPABILITIES = ("chown", "dac_override", "dac_read_search", "fowner", "fsetid", "mknod")


class VmError(RuntimeError):
    """Starting or running the VM failed; `stage` is one of image, config, transport, sharefs,
    template, qemu, agent."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


@dataclass
class BootTimeline:
    """Seconds from QEMU's spawn (host clock); *_guest_s: guest uptime (a printk timestamp, or
    for the agent the `ready=` it reports)."""

    qmp_connected_s: float
    first_console_s: float | None
    kernel_init_s: float | None  # the kernel ran /init
    kernel_init_guest_s: float | None
    agent_ready_s: float  # the agent printed "vmm-task ready"
    agent_ready_guest_s: float | None
    qemu_cpu_s: float | None  # CPU time QEMU used until the agent was ready
    # The numbers the agent put on its ready line ("started=2.301s main=2.410s ready=3.2s rss=14.1MB").
    agent_reported: dict[str, float]
    # A VM restored from a template (vmm/clone.py): the template's key, and the restore's steps
    # (seconds from QEMU's spawn; template_s, ram_copy_s: before it). agent_ready_s: the agent answered.
    template: str | None = None
    restore: dict[str, float] | None = None

    def as_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


class GuestVm:
    def __init__(self, config: Config, run_dir: Path, *, name: str = "vmm-task",
                 share_dir: Path | None = None, kernel_params: Sequence[str] = (),
                 nics: Sequence[TapNic] = (), vsock_backend: VsockBackend | None = None,
                 cgroup: Cgroup | None = None, vmm_uid: int | None = None,
                 mount_namespace: str | None = None, templates: TemplateStore | None = None):
        self.config = config
        # Restore from the daemon's template of this size instead of booting (vmm/clone.py);
        # `ram_file`: the clone's own copy of the template's RAM, removed with the VM.
        self.templates = templates
        self.ram_file: Path | None = None
        # Where `share_dir`'s mounts are (host_sandboxer/mountns): virtiofsd, or QEMU serving
        # 9p, runs there; None: in ours.
        self.mount_namespace = mount_namespace
        self.cgroup = cgroup  # QEMU and virtiofsd join it (containment/cgroups.py)
        self.vmm_uid = vmm_uid  # QEMU's uid and gid (containment/uids.py); None: root
        self.vsock_backend = vsock_backend
        self.detached = vsock_backend is not None
        self.run_dir = run_dir
        self.name = name
        self.share_dir = share_dir
        self.nics = tuple(nics)  # taps from host_sandboxer.network; the caller owns their fds
        self.kernel_params = tuple(config.vm.kernel_params.split()) + tuple(kernel_params)
        self.host = HostFacts.probe()
        self.accel = resolve_accel(config.vm.accel, self.host)
        self.transport = None
        self.virtiofsd: Virtiofsd | None = None
        self.qemu: Qemu | None = None
        self.timeline: BootTimeline | None = None
        self._closing: asyncio.Future | None = None
        # A clone's template and RAM copy, begun by prepare() before start() (vmm/clone.py).
        self.prepared: asyncio.Future | None = None
        # A restored VM's ttrpc client, connected to the agent since its Check (vmm/clone.py).
        self.agent_client = None

    def hand_over_agent_client(self):
        """The client a restore left connected to the agent (None for a booted VM), now the
        caller's to use and close."""
        client, self.agent_client = self.agent_client, None
        return client

    def prepare(self) -> None:
        """For a VM restored from a template, begin what needs no pod resource (the template,
        built if need be, and the clone's RAM copy) while the caller makes the pod's mounts,
        cgroup and links; start() waits for it. Nothing for a booted VM."""
        if self.templates is not None and self.prepared is None:
            from host_sandboxer.vmm import clone
            self.prepared = asyncio.ensure_future(clone.prepare(self))

    @property
    def console(self):
        return self.qemu.console

    @property
    def exited(self) -> asyncio.Future[int]:
        """Resolves with QEMU's exit status when it ends (expected or not)."""
        return self.qemu.exited

    async def start(self) -> BootTimeline:
        try:
            return await self._start()
        except BaseException:
            await self.close()
            raise

    async def open_connection(self, port: int | None = None):
        """(reader, writer) to a guest vsock port (default: the agent's)."""
        return await self.transport.open_connection(port or self.config.agent.port)

    async def open_socket(self, port: int):
        """A socket streaming to guest vsock `port` (for relays that run on the socket itself)."""
        return await self.transport.open_socket(port)

    async def ttrpc_client(self, port: int | None = None):
        """A ttrpc client connected to the agent (or to `port`)."""
        from vmm_common import ttrpc
        reader, writer = await self.open_connection(port)
        return ttrpc.Client(reader, writer)

    @classmethod
    async def attach(cls, config: Config, run_dir: Path, record: dict, *, name: str,
                     vsock_backend: VsockBackend, share_dir: Path | None = None) -> "GuestVm":
        """The detached VM `record` (from `record()`) describes, taken over: QMP and console
        reconnected, vsock reached again. Raises VmError if it is gone or its vsock or shared
        directory server is; whatever of it still ran is then stopped."""
        vm = cls(config, run_dir, name=name, share_dir=share_dir, vsock_backend=vsock_backend)
        try:
            await vm._attach(record)
        except BaseException:
            await vm.close()
            raise
        return vm

    def record(self) -> dict:
        """Who the VM's processes are (pid + start time), for `attach()`."""
        return {"qemu": process.identity(self.qemu.proc),
                "virtiofsd": process.identity(self.virtiofsd.proc) if self.virtiofsd else None,
                "vsock": self.transport.record() if hasattr(self.transport, "record")
                else {"kind": "kernel", "cid": self.transport.guest_cid},
                "ram_file": str(self.ram_file) if self.ram_file else None}

    async def close(self) -> None:
        """Stop QEMU, then virtiofsd and the transport. One close runs, however many ask (the
        VM's watch and a Shutdown may at once): each returns when it is done, and a caller
        cancelled meanwhile does not cut it short."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        if self.prepared is not None:  # the RAM copy it makes is removed below
            await asyncio.wait({self.prepared})
            if not self.prepared.cancelled():
                self.prepared.exception()  # retrieved: start() reported it, or the caller's failure is the story
        if self.agent_client is not None:
            await self.agent_client.close()
        if self.qemu is not None:
            await self.qemu.close()
        if self.virtiofsd is not None:
            await self.virtiofsd.stop()
        if self.transport is not None:
            with contextlib.suppress(Exception):
                await self.transport.close()
        if self.ram_file is not None:
            self.ram_file.unlink(missing_ok=True)

    async def _start(self) -> BootTimeline:
        vm = self.config.vm
        if boot_image(vm) == "pmem" and vm.machine != "q35":
            raise VmError("config", f"vm.image = pmem needs vm.machine = q35, not {vm.machine}")
        for what, path in (("kernel", vm.kernel), *self._boot_image()):
            if not path.is_file():
                raise VmError("image", f"no {what} at {path} (run `make guest-image` or set vm.{what})")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        # Fail early on a deep run_dir. The longest socket name always made is hybrid vsock's
        # `vhost-vsock.sock`; its guest->host listeners `vsock.sock_<port>` are as long up to port 99999.
        self._socket_path("vhost-vsock.sock")
        self.transport = self._make_transport()
        if self.templates is not None:  # its devices come after the restore: their backends start meanwhile
            from host_sandboxer.vmm import clone
            return await clone.start(self, self._share_device(), self._start_backends)
        share = await self._start_backends()
        confinement = self.qemu_confinement(share)
        fds = QemuFds()
        try:
            self.qemu = Qemu(await self._spec_with_fds(share, fds), self.run_dir)
            await self.qemu.start(confinement)
        except QemuError as e:
            raise VmError("qemu", str(e)) from None
        finally:
            fds.close()
        return await self._wait_ready()

    def _spec(self, share, vsock_args: Sequence[str] | None = None, **sockets) -> VmSpec:
        """What QEMU runs; `sockets`: the fds made for it (VmSpec's console_fd, qmp_fd,
        inherited_fds), with the `share` and `vsock_args` that name theirs."""
        vm = self.config.vm
        return VmSpec(
            qemu=vm.qemu, machine=vm.machine, accel=self.accel.accel, cpus=vm.cpus, max_cpus=vm.max_cpus,
            memory_mib=vm.memory_mib,
            tsc_khz=self.host.tsc_khz,
            kernel=vm.kernel, initrd=vm.initrd if boot_image(vm) == "initrd" else None,
            root=PmemRoot(vm.rootfs, vm.rootfs.stat().st_size) if boot_image(vm) == "pmem" else None,
            free_page_reporting=vm.free_page_reporting, name=self.name,
            console_socket=self._socket_path("console.sock"), qmp_socket=self._socket_path("qmp.sock"), **sockets,
            vsock_args=tuple(self.transport.qemu_args() if vsock_args is None else vsock_args),
            share=share, nics=self.nics, seccomp=self.config.containment.seccomp,
            kernel_params=self._agent_params() + self.kernel_params)

    def clonable_spec(self, ram_file: Path, run_dir: Path, **sockets) -> VmSpec:
        """A template's command line, and its clones' (with `incoming`): RAM in `ram_file`, no
        vsock, share or NIC (the clone's are hot-plugged), the agent told its share is virtiofs and
        to import before ready what a pod's start imports (task.preload: every clone inherits it)."""
        spec = self._spec(None, (), **sockets)
        return replace(spec, nics=(), clonable=True, ram_file=ram_file,
                       console_socket=run_dir / "console.sock", qmp_socket=run_dir / "qmp.sock",
                       kernel_params=(*TEMPLATE_PARAMS, *spec.kernel_params))

    def _boot_image(self) -> tuple[tuple[str, Path]]:
        """(config key, path) of what the guest boots from besides the kernel."""
        vm = self.config.vm
        return (("rootfs", vm.rootfs),) if boot_image(vm) == "pmem" else (("initrd", vm.initrd),)

    async def _spec_with_fds(self, share, fds: QemuFds) -> VmSpec:
        """The spec with every socket QEMU uses made for it in `fds` (qemu_fds.py)."""
        try:
            if self.transport.kind == "kernel":
                from host_sandboxer.vsock.kernel import VHOST_VSOCK_DEVICE
                vsock_args = self.transport.qemu_args(vhostfd=fds.open(VHOST_VSOCK_DEVICE))
            else:
                vsock_args = self.transport.qemu_args(fd=await fds.connect(Path(self.transport.vhost_socket)))
        except OSError as e:
            raise VmError("transport", f"cannot connect QEMU's vsock device: {e}") from None
        if isinstance(share, VirtiofsShare):
            try:
                share = replace(share, fd=await fds.connect(share.socket_path))
            except OSError as e:
                raise VmError("sharefs", f"cannot connect to virtiofsd: {e}: {self.virtiofsd.output.tail()}") from None
        console, qmp = fds.listen(self._socket_path("console.sock")), fds.listen(self._socket_path("qmp.sock"))
        return self._spec(share, vsock_args, console_fd=console, qmp_fd=qmp, inherited_fds=tuple(fds.fds))

    def qemu_confinement(self, share) -> Confinement:
        """The pod's cgroup, and no capabilities (9p: its file capabilities, as root); as
        `vmm_uid` if it may read the image and use /dev/kvm, else VmError."""
        cgroup_procs = self.cgroup.procs_files if self.cgroup else ()
        if isinstance(share, NinePShare) or self.vmm_uid is None:
            capabilities = NINE_P_CAPABILITIES if isinstance(share, NinePShare) else NO_CAPABILITIES
            return Confinement(cgroup_procs, capabilities=capabilities, no_new_privs=True,
                               die_with_us=not self.detached,
                               mount_namespace=self.mount_namespace if isinstance(share, NinePShare) else None)
        for path in (self.config.vm.kernel, *(path for _, path in self._boot_image())):
            if not readable_by_others(path):
                raise VmError("image", f"QEMU runs as uid {self.vmm_uid} (containment.vmm_user) and cannot "
                                       f"read {path}: make it and its directories readable by others")
        return Confinement(cgroup_procs, user=self.vmm_uid, groups=self._kvm_groups(), capabilities=NO_CAPABILITIES,
                           no_new_privs=True, die_with_us=not self.detached)

    def _kvm_groups(self) -> tuple[int, ...]:
        """The group that lets QEMU's own user open /dev/kvm, if it needs one."""
        if self.accel.accel != "kvm":
            return ()
        st = os.stat(KVM_DEVICE)
        if st.st_mode & 0o006 == 0o006:
            return ()
        if st.st_mode & 0o060 == 0o060:
            return (st.st_gid,)
        raise VmError("config", f"QEMU runs as uid {self.vmm_uid} (containment.vmm_user) and cannot open "
                                f"{KVM_DEVICE} (mode {st.st_mode & 0o777:o}): give it a group with rw (kvm, 0660)")

    async def _attach(self, record: dict) -> None:
        from host_sandboxer.vsock import KernelVsock
        self.ram_file = Path(record["ram_file"]) if record.get("ram_file") else None
        vsock = record.get("vsock") or {}
        if vsock.get("kind") == "kernel":
            self.transport = KernelVsock(vsock["cid"])
            await self.transport.start()
            vsock_alive = True
        else:
            self.transport = BackendVsock(self.vsock_backend, self.run_dir)
            try:
                vsock_alive = await self.transport.adopt()
            except (OSError, ValueError, VsockBackendError, asyncio.TimeoutError) as e:
                raise VmError("transport", f"cannot reach the vsock backend: {e}") from None
        share = self._share_device()
        if isinstance(share, VirtiofsShare):
            self.virtiofsd = self._virtiofsd(share.socket_path)
            self.virtiofsd.adopt(record.get("virtiofsd"))
        self.qemu = Qemu(self._spec(share), self.run_dir)
        proc = process.adopt(record.get("qemu"))
        if proc is None:
            raise VmError("qemu", f"QEMU (pid {(record.get('qemu') or {}).get('pid')}) is gone")
        try:
            await self.qemu.attach(proc)
        except QemuError as e:
            raise VmError("qemu", str(e)) from None
        if not vsock_alive:
            raise VmError("transport", self.qemu.failure("its vsock backend is gone: the VM is unreachable"))
        if self.virtiofsd is not None and self.virtiofsd.proc is None:
            raise VmError("sharefs", self.qemu.failure("its virtiofsd is gone: the shared directory is lost"))

    def _make_transport(self):
        from host_sandboxer import vsock
        try:
            kind = vsock.choose_kind(self.config.vsock.transport)
            if self.detached and kind == "hybrid":
                return BackendVsock(self.vsock_backend, self.run_dir)
            return vsock.create_transport(kind, str(self.run_dir))
        except (ValueError, RuntimeError) as e:
            raise VmError("transport", str(e)) from None

    def _share_device(self):
        if self.share_dir is None:
            return None
        if self.config.sharefs.type == "9p":
            return NinePShare(self.share_dir)
        return VirtiofsShare(self._socket_path("virtiofsd.sock"))

    def _virtiofsd(self, socket_path: Path) -> Virtiofsd:
        return Virtiofsd(self.config.sharefs.virtiofsd, self.share_dir, socket_path,
                         self.run_dir / "virtiofsd.log", cache=self.config.sharefs.cache)

    async def _start_backends(self):
        """The vsock transport, then the shared directory's server; the share (None without)."""
        try:
            await self.transport.start()
        except Exception as e:
            raise VmError("transport", f"vsock transport {self.config.vsock.transport}: {e}") from e
        return await self._start_sharefs()

    async def _start_sharefs(self):
        share = self._share_device()
        if isinstance(share, VirtiofsShare):
            self.virtiofsd = self._virtiofsd(share.socket_path)
            try:
                await self.virtiofsd.start(self.cgroup.procs_files if self.cgroup else (),
                                           die_with_us=not self.detached, mount_namespace=self.mount_namespace)
            except VirtiofsdError as e:
                raise VmError("sharefs", str(e)) from None
        return share

    def _agent_params(self) -> tuple[str, ...]:
        agent = self.config.agent
        return (f"task.log_level={agent.log_level}",) + (("task.debug",) if agent.debug else ())

    async def _wait_ready(self) -> BootTimeline:
        qemu = self.qemu
        qmp_connected = time.monotonic()
        kernel_init = qemu.console.line_containing(KERNEL_INIT_LINE)
        ready = qemu.console.line_containing(READY_LINE)
        timeout = self.config.vm.boot_timeout_s
        await asyncio.wait({ready, qemu.exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            what = "QEMU died before the agent was ready" if qemu.exited.done() \
                else f"agent not ready within {timeout:g} s (no '{READY_LINE}' on the console)"
            raise VmError("qemu" if qemu.exited.done() else "agent", qemu.failure(what))
        start = qemu.started_at
        first = qemu.console.first_output.result() if qemu.console.first_output.done() else None
        init = kernel_init.result() if kernel_init.done() else None
        line = ready.result()
        reported = reported_numbers(line.text)
        self.timeline = BootTimeline(
            qmp_connected_s=qmp_connected - start,
            first_console_s=first - start if first is not None else None,
            kernel_init_s=init.host_time - start if init else None,
            kernel_init_guest_s=init.guest_time if init else None,
            agent_ready_s=line.host_time - start,
            agent_ready_guest_s=reported.get("ready", line.guest_time),
            qemu_cpu_s=qemu.cpu_seconds(),
            agent_reported=reported)
        return self.timeline

    def _socket_path(self, name: str) -> Path:
        path = self.run_dir / name
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise VmError("config", f"socket path {path} is longer than {UNIX_PATH_MAX} bytes; use a shorter state dir")
        return path


def reported_numbers(ready_line: str) -> dict[str, float]:
    """The key=number pairs the agent put on its ready line."""
    return {key: float(value) for key, value in _REPORTED.findall(ready_line.partition(READY_LINE)[2])}


def readable_by_others(path: Path) -> bool:
    """Whether a user with no right of its own on `path` can read it: others may read the file
    and search every directory above it."""
    path = Path(path).resolve()
    try:
        return bool(path.stat().st_mode & 0o004) and all(d.stat().st_mode & 0o001 for d in path.parents)
    except OSError:
        return False
