"""A pod's VM restored from the daemon's template of its size instead of booted ([vm] template;
docs/templates.md): `start()` is GuestVm's start once the vsock backend and virtiofsd serve it.

Restore: a sparse copy of the template's RAM, QEMU on it with the template's command line and
`-incoming defer`, the saved state loaded (snapshot.py), `cont`. Then what is the pod's, by
hot-plug (hotplug.py): its NICs first (so they exist when the agent is asked to configure
them), its vsock link, its shared directory. Once the agent answers over the new vsock device,
SyncClock: the guest's clock still reads the moment the template was saved. The guest's kernel
reseeds its CRNG on the restore itself (vmgenid); the agent mounts the share and reseeds again
at SetupSandbox, which the daemon sends next as for a booted VM.
"""
from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Awaitable, Callable

from google.protobuf import empty_pb2
from qemu.qmp import QMPError

from host_sandboxer.config import boot_image
from host_sandboxer.containment.launch import NO_CAPABILITIES, Confinement
from host_sandboxer.vmm import hotplug, snapshot
from host_sandboxer.vmm.cmdline import (HOTPLUG_FS_PORT, HOTPLUG_NIC_PORTS, HOTPLUG_VSOCK_PORT, SHARE_TAG,
                                        VirtiofsShare, build_argv)
from host_sandboxer.vmm.qemu import Qemu, QemuError, qmp_error
from host_sandboxer.vmm.qemu_fds import QemuFds
from host_sandboxer.vmm.template import Template, TemplateError, file_digest
from host_sandboxer.vmm.vm import READY_LINE, BootTimeline, GuestVm, VmError, reported_numbers
from vmm_common import ttrpc
from vmm_common.protos import SANDBOX_SERVICE as SANDBOX
from vmm_common.protos.kuasar import sandbox_pb2 as pb

ANSWER_POLL_S = 0.02
CHECK_TIMEOUT_S = 2.0


async def start(vm: GuestVm, share, start_backends: Callable[[], Awaitable]) -> BootTimeline:
    """Restore `vm` from its template (built first if there is none) while `start_backends()` (its
    vsock link and virtiofsd, which its devices need only once it runs) runs, then attach its
    devices; returns once the agent answers and the guest's clock is the host's. VmError otherwise."""
    _check_supported(vm, share)
    backends = asyncio.ensure_future(start_backends())
    try:
        template, marks = await _restore(vm, share)
    except BaseException:
        await asyncio.wait({backends})  # what it started is closed with the VM; the restore's error is the story
        if not backends.cancelled():
            backends.exception()
        raise
    await backends
    qemu = vm.qemu
    try:
        for nic, port in zip(vm.nics, HOTPLUG_NIC_PORTS):
            await hotplug.add_tap_nic(qemu, nic, port, vm.config.vm.machine)
        await hotplug.add_vhost_user(qemu, "vsock0", vm.transport.vhost_socket,
                                     {"driver": "vhost-user-vsock-pci", "id": "vsock", "bus": HOTPLUG_VSOCK_PORT})
        if share is not None:
            await hotplug.add_vhost_user(qemu, "fs", share.socket_path, {
                "driver": "vhost-user-fs-pci", "id": "fs", "tag": SHARE_TAG, "bus": HOTPLUG_FS_PORT})
        marks["devices_added_s"] = time.monotonic() - qemu.started_at
    except QemuError as e:
        raise VmError("qemu", str(e)) from None
    except QMPError as e:
        raise VmError("qemu", qemu.failure(f"attaching the pod's devices failed: {qmp_error(e)}")) from None
    except OSError as e:
        raise VmError("transport", qemu.failure(f"cannot connect a device's backend: {e}")) from None
    client = await _agent(vm)
    answered = time.monotonic()
    try:
        await _sync_clock(client)
    except (ttrpc.RpcError, OSError, asyncio.TimeoutError) as e:
        await client.close()
        raise VmError("agent", qemu.failure(f"SyncClock after the restore failed: {e}")) from None
    vm.agent_client = client  # the pod's calls go on over it: no second connection to open
    marks["clock_synced_s"] = time.monotonic() - qemu.started_at
    vm.timeline = BootTimeline(
        qmp_connected_s=marks.pop("qmp_connected_s"), first_console_s=None, kernel_init_s=None, kernel_init_guest_s=None,
        agent_ready_s=answered - qemu.started_at, agent_ready_guest_s=None, qemu_cpu_s=qemu.cpu_seconds(),
        agent_reported=template.reported, template=template.key[:16], restore={k: round(v, 3) for k, v in marks.items()})
    return vm.timeline


async def prepare(vm: GuestVm) -> tuple[Template, dict[str, float]]:
    """The template (built if need be) and the clone's RAM copied from it (`vm.ram_file`); the
    template and the steps' seconds (template_s, ram_copy_s)."""
    began = time.monotonic()
    try:
        inputs, image = await asyncio.to_thread(_inputs, vm)  # hashes files: once per file per process
        template = await vm.templates.get(_slot(vm), inputs, image, build=lambda t: _build(vm, t))
        got = time.monotonic()
        vm.ram_file = await vm.templates.clone_ram(template, vm.name, vm.vmm_uid)
    except (TemplateError, QemuError, OSError) as e:
        raise VmError("template", str(e)) from None
    except asyncio.TimeoutError:
        raise VmError("template", "saving the template took too long") from None
    except QMPError as e:
        raise VmError("template", f"building the template failed: {qmp_error(e)}") from None
    return template, {"template_s": got - began, "ram_copy_s": time.monotonic() - got}


async def _restore(vm: GuestVm, share) -> tuple[Template, dict[str, float]]:
    """The template and the clone's RAM (`prepare`, begun by GuestVm.prepare() or now), QEMU
    started on it and the saved state loaded: the guest runs, without any device of the pod's
    yet. The template and the steps' seconds (template_s, ram_copy_s before QEMU's spawn, the
    rest from it)."""
    if vm.prepared is None:
        vm.prepare()
    template, marks = await vm.prepared
    fds = QemuFds()
    try:
        spec = vm.clonable_spec(vm.ram_file, vm.run_dir, incoming=True,
                                console_fd=fds.listen(vm.run_dir / "console.sock"),
                                qmp_fd=fds.listen(vm.run_dir / "qmp.sock"), inherited_fds=tuple(fds.fds))
        vm.qemu = Qemu(spec, vm.run_dir)
        await vm.qemu.start(vm.qemu_confinement(share), run=False)
    except QemuError as e:
        raise VmError("qemu", str(e)) from None
    finally:
        fds.close()
    qemu = vm.qemu
    marks["qmp_connected_s"] = time.monotonic() - qemu.started_at
    try:
        await snapshot.restore(qemu, template.state)
    except QemuError as e:
        raise VmError("qemu", str(e)) from None
    except QMPError as e:
        raise VmError("qemu", qemu.failure(f"restoring the guest failed: {qmp_error(e)}")) from None
    marks["running_s"] = time.monotonic() - qemu.started_at
    marks["running_cpu_s"] = qemu.cpu_seconds() or 0.0  # QEMU's start-up and the restore, under TCG
    return template, marks


def _check_supported(vm: GuestVm, share) -> None:
    if vm.config.vm.machine != "q35":
        raise VmError("config", f"vm.template needs vm.machine = q35 (clones hot-plug into PCIe root ports), "
                                f"not {vm.config.vm.machine}")
    if getattr(vm.transport, "kind", None) != "hybrid" or not hasattr(vm.transport, "vhost_socket"):
        raise VmError("config", "vm.template needs hybrid vsock (vsock.transport = hybrid): "
                                "hot-plugging kernel vhost-vsock into a clone is not done")
    if share is not None and not isinstance(share, VirtiofsShare):
        raise VmError("config", "vm.template needs sharefs.type = virtiofs: QEMU cannot hot-plug a 9p share")
    if len(vm.nics) > len(HOTPLUG_NIC_PORTS):
        raise VmError("config", f"a clone takes at most {len(HOTPLUG_NIC_PORTS)} NICs, the pod has {len(vm.nics)}")


def _slot(vm: GuestVm) -> str:
    v = vm.config.vm
    return f"c{v.cpus}-m{v.memory_mib}-x{v.max_cpus}"


def _inputs(vm: GuestVm) -> tuple[dict, str]:
    """Everything the template's guest depends on (its command line with the per-run paths
    fixed, and the contents of its files), and the digest of its files alone."""
    v = vm.config.vm
    qemu = shutil.which(v.qemu) or v.qemu
    image = v.rootfs if boot_image(v) == "pmem" else v.initrd
    files = {"kernel": file_digest(v.kernel), "image": file_digest(image), "qemu": file_digest(qemu)}
    argv = build_argv(replace(vm.clonable_spec(Path("template.ram"), Path("run")), name="template"))
    return {"argv": argv, "files": files}, "-".join(files.values())


async def _build(vm: GuestVm, template: Template) -> dict:
    """Boot the template's guest to ready and save it; the numbers on the agent's ready line.
    Its QEMU runs as root without capabilities in the daemon's cgroup: it belongs to no pod
    (template.py)."""
    fds = QemuFds()
    try:
        spec = replace(vm.clonable_spec(template.ram, template.dir, console_fd=fds.listen(template.dir / "console.sock"),
                                qmp_fd=fds.listen(template.dir / "qmp.sock"), inherited_fds=tuple(fds.fds)),
                       name=f"template-{template.slot}")
        qemu = Qemu(spec, template.dir)
        ready = qemu.console.line_containing(READY_LINE)
        await qemu.start(Confinement(capabilities=NO_CAPABILITIES, no_new_privs=True, die_with_us=True))
    finally:
        fds.close()
    try:
        timeout = vm.config.vm.boot_timeout_s
        await asyncio.wait({ready, qemu.exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            raise TemplateError(qemu.failure(f"the template's agent was not ready within {timeout:g} s"))
        await snapshot.save(qemu, template.state)
    finally:
        await qemu.close()
    return reported_numbers(ready.result().text)


async def _agent(vm: GuestVm) -> ttrpc.Client:
    """A client to the agent once it answers Check over the hot-plugged vsock device."""
    timeout = vm.config.vm.boot_timeout_s
    deadline = time.monotonic() + timeout
    while True:
        client = None
        try:
            client = await vm.ttrpc_client()
            await client.call(SANDBOX, "Check", pb.CheckRequest(), empty_pb2.Empty, timeout=CHECK_TIMEOUT_S)
            return client
        except (OSError, asyncio.TimeoutError, ttrpc.RpcError) as e:
            if client is not None:
                await client.close()
            if vm.qemu.exited.done() or time.monotonic() > deadline:
                raise VmError("agent", vm.qemu.failure(f"the restored agent did not answer within {timeout:g} s: "
                                                       f"{type(e).__name__}: {e}")) from None
        await asyncio.sleep(ANSWER_POLL_S)


async def _sync_clock(client: ttrpc.Client) -> None:
    """Kuasar's two-step SyncClock: measure the offset, then have the guest move its clock by it."""
    sent = time.clock_gettime_ns(time.CLOCK_REALTIME)
    reply = await client.call(SANDBOX, "SyncClock", pb.SyncClockPacket(ClientSendTime=sent), pb.SyncClockPacket,
                              timeout=CHECK_TIMEOUT_S)
    arrived = time.clock_gettime_ns(time.CLOCK_REALTIME)
    delta = ((sent - reply.ClientArriveTime) + (arrived - reply.ServerSendTime)) // 2
    if delta:
        await client.call(SANDBOX, "SyncClock", pb.SyncClockPacket(Delta=delta), pb.SyncClockPacket,
                          timeout=CHECK_TIMEOUT_S)
