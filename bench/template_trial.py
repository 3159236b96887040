"""VM templates on this machine's QEMU: boot a template to "vmm-task ready", save it, restore clones.

    python -m bench.template_trial [--clones 2] [--parallel 5] [--ram copy|stream|private] [--image DIR]

The clones are inspected through ExecVMProcess (task.debug) with the host's static busybox in
their share; the CRNG output before SetupSandbox needs the debug image (`make guest-image
DEBUG=1`), else it reads as an error. Prints one JSON object:

- `floor`: the busybox floor's cold boot (bench.boot's), the yardstick of issue 15's targets.
- `cold`: a pod's boot today (GuestVm: hybrid vsock + virtiofs) to the agent answering Check,
  then SetupSandbox (`pod_ready_s`).
- `template`: its boot to ready (RAM in a /dev/shm file, no vhost-user device: QEMU 7.2 cannot
  migrate one, spare pcie-root-ports to hot-plug into, vmgenid), and the save (x-ignore-shared:
  only device state goes to the file, the RAM stays in the RAM file). Its agent parameters are the
  daemon's template's (vm.TEMPLATE_PARAMS: task.preload) plus task.debug; unlike the daemon's
  default (a pmem root) it boots the initrd.
- `clones`: per clone the restore timeline (seconds from QEMU's spawn; the RAM copy before it,
  and `agent_answered_since_request` includes it): state loaded, running,
  the vsock and virtiofs devices hot-plugged, the agent answering over vsock, SetupSandbox
  done (`pod_ready`: the agent reseeds its CRNG and mounts the share), a NIC hot-plugged; what
  the clone's guest reports (a kernel UUID, i.e. CRNG output, before and after SetupSandbox, the
  share's file, its MAC);
  its host memory; and QEMU's answer when asked to migrate it with the vhost-user devices in.
- `parallel`: with --parallel N, N clones restored at once, each to pod ready.

--ram copy: each clone maps its own sparse copy of the template's RAM file (x-ignore-shared).
--ram stream: the template is saved with its RAM in the stream, and each clone loads it into a
fresh memfd (no copy of the file, the whole RAM read from the stream).
--ram private: each clone maps the template's RAM file privately (share=off, copy-on-write): no
copy, but a vhost-user backend maps the file itself and so sees the template's pages.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.boot import FLOOR_DIR, bench_config
from host_sandboxer.config import DEFAULT_IMAGE_DIR
from host_sandboxer.containment.launch import Confinement
from host_sandboxer.vmm import hotplug, snapshot
from host_sandboxer.vmm.cmdline import HOTPLUG_FS_PORT, HOTPLUG_NIC_PORTS, HOTPLUG_VSOCK_PORT, SHARE_TAG, VmSpec
from host_sandboxer.vmm.qemu import Qemu
from host_sandboxer.vmm.virtiofsd import Virtiofsd
from host_sandboxer.vmm.vm import READY_LINE, TEMPLATE_PARAMS, GuestVm
from host_sandboxer.vsock.hybrid import HybridVsock
from initrd import floor
from kernel import build as kernel_build
from google.protobuf import empty_pb2

from vmm_common import ttrpc
from vmm_common.protos.kuasar import sandbox_pb2 as pb

SANDBOX = "grpc.SandboxService"
AGENT_PORT = 1024
AGENT_TIMEOUT_S = 20.0
UUID = "cat /proc/sys/kernel/random/uuid"  # 16 bytes of the kernel's CRNG
# The host's static busybox, put in each clone's share: commands after SetupSandbox (which mounts
# the share) need no debug image. Before it, only a DEBUG=1 image has a `cat`.
HOST_BUSYBOX = "/bin/busybox"
SHARED_BUSYBOX = "/run/kuasar/state/busybox"


def _spec(config, run_dir: Path, name: str, **kw) -> VmSpec:
    vm = config.vm
    return VmSpec(kernel=vm.kernel, initrd=vm.initrd, console_socket=run_dir / "console.sock",
                  qmp_socket=run_dir / "qmp.sock", machine="q35", accel="tcg", cpus=vm.cpus,
                  memory_mib=vm.memory_mib, name=name, clonable=True,
                  kernel_params=("task.debug", *TEMPLATE_PARAMS), **kw)


async def cold_boot(config, work: Path) -> dict:
    """A pod's VM as booted today, to the agent answering Check over vsock."""
    share = work / "cold-share"
    share.mkdir()
    vm = GuestVm(config, work / "cold", name="cold", share_dir=share)
    try:
        timeline = await vm.start()
        client = await vm.ttrpc_client()
        await client.call(SANDBOX, "Check", pb.CheckRequest(), pb.CheckRequest().__class__)
        answered = time.monotonic() - vm.qemu.started_at
        setup = await setup_sandbox(client, "cold")
        pod_ready = time.monotonic() - vm.qemu.started_at
        cpu = vm.qemu.cpu_seconds()
        await client.close()
        return {"ready_s": round(timeline.agent_ready_s, 3), "agent_answered_s": round(answered, 3),
                "setup_sandbox": setup, "pod_ready_s": round(pod_ready, 3), "qemu_cpu_s_at_pod_ready": cpu,
                "qemu_pss_kb": _pss_kb(vm.qemu.proc.pid)}
    finally:
        await vm.close()


async def make_template(config, work: Path, ram_mode: str) -> dict:
    """Boot the template to ready, stop it and save its device state (and, for `stream`, RAM)."""
    run_dir = work / "template"
    run_dir.mkdir()
    ram = Path("/dev/shm") / f"{work.name}-template.ram"
    qemu = Qemu(_spec(config, run_dir, "template", ram_file=ram), run_dir)
    try:
        ready = qemu.console.line_containing(READY_LINE)
        await qemu.start(Confinement(die_with_us=True))
        await asyncio.wait_for(ready, AGENT_TIMEOUT_S)
        ready_s = ready.result().host_time - qemu.started_at
        t = time.monotonic()
        state = work / "template.state"
        await snapshot.save(qemu, state, ignore_shared=ram_mode != "stream")
        save_s = time.monotonic() - t
    except BaseException:
        print(qemu.failure("template failed"))
        raise
    finally:
        await qemu.close()
    return {"ready_s": round(ready_s, 3), "save_s": round(save_s, 3), "ram_file": str(ram),
            "ram_file_used_kb": _allocated_kb(ram), "state_file": str(state),
            "state_kb": state.stat().st_size // 1024}


async def floor_boot(config, work: Path) -> dict:
    """The floor's boot (same kernel, launcher and devices; busybox /init) to its ready line."""
    manifest = json.loads((config.vm.initrd.parent / "manifest.json").read_text())
    initrd = floor.build_floor(FLOOR_DIR, manifest["initrd"]["compression"], kernel_build.default_cache())
    share = work / "floor-share"
    share.mkdir()
    vm = GuestVm(dataclasses.replace(config, vm=dataclasses.replace(config.vm, image="initrd", initrd=initrd)),
                 work / "floor", name="floor", share_dir=share)
    try:
        timeline = await vm.start()
        return {"ready_s": round(timeline.agent_ready_s, 3), "qemu_cpu_s": timeline.qemu_cpu_s}
    finally:
        await vm.close()


async def restore_clone(config, work: Path, template: dict, index: int, ram_mode: str,
                        full: bool = True) -> dict:
    """One clone restored to pod ready (vsock, share, SetupSandbox); `full`: also a NIC, the
    guest's view and QEMU's refusal to migrate it."""
    run_dir = work / f"clone{index}"
    run_dir.mkdir()
    marks: dict[str, float] = {}
    t0 = time.monotonic()
    ram = Path(template["ram_file"]) if ram_mode == "private" else None
    if ram_mode == "copy":
        ram = Path("/dev/shm") / f"{work.name}-clone{index}.ram"
        subprocess.run(["cp", "--sparse=always", template["ram_file"], str(ram)], check=True)
        marks["ram_copied"] = time.monotonic() - t0
    qemu = Qemu(_spec(config, run_dir, f"clone{index}", ram_file=ram, incoming=True), run_dir)
    if ram_mode == "private":  # the template's file mapped copy-on-write: no copy, nothing shared
        qemu.argv = [a.replace(f"mem-path={ram},share=on", f"mem-path={ram},share=off") for a in qemu.argv]
    transport = HybridVsock(run_dir / "vhost-vsock.sock", run_dir / "vsock.sock", guest_cid=100 + index)
    share = run_dir / "share"
    share.mkdir()
    (share / "hello").write_text(f"clone {index}\n")
    shutil.copy2(HOST_BUSYBOX, share / "busybox")
    virtiofsd = Virtiofsd(config.sharefs.virtiofsd, share, run_dir / "virtiofsd.sock", run_dir / "virtiofsd.log")
    result: dict = {"guest_cid": transport.guest_cid, "mac": f"52:54:00:00:01:{index:02x}"}
    try:
        await transport.start()
        await virtiofsd.start()
        await qemu.start(Confinement(die_with_us=True), run=False)
        spawn = qemu.started_at
        await snapshot.restore(qemu, Path(template["state_file"]), ignore_shared=ram_mode != "stream")
        marks["running"] = time.monotonic() - spawn
        await hotplug.add_vhost_user(qemu, "vsock0", transport.vhost_socket,
                                     {"driver": "vhost-user-vsock-pci", "id": "vsock", "bus": HOTPLUG_VSOCK_PORT})
        marks["vsock_added"] = time.monotonic() - spawn
        # The share goes in before the agent is first asked anything: the guest sets both
        # devices up while the host waits.
        await hotplug.add_vhost_user(qemu, "fs0", virtiofsd.socket_path,
                                     {"driver": "vhost-user-fs-pci", "id": "fs", "tag": SHARE_TAG, "bus": HOTPLUG_FS_PORT})
        marks["share_added"] = time.monotonic() - spawn
        client = await _agent(transport)
        marks["agent_answered"] = time.monotonic() - spawn
        marks["agent_answered_since_request"] = time.monotonic() - t0  # the RAM copy included
        if full:
            result["kernel_uuid"] = await _exec(client, UUID)
        result["setup_sandbox"] = await setup_sandbox(client, f"clone{index}")
        marks["pod_ready"] = time.monotonic() - spawn
        marks["pod_ready_since_request"] = time.monotonic() - t0
        result["qemu_cpu_s_at_pod_ready"] = qemu.cpu_seconds()  # emulation work, least blurred by load
        if not full:
            await client.close()
            return result
        result["kernel_uuid_after_setup"] = await _exec(client, f"{SHARED_BUSYBOX} {UUID}")
        result["share"] = await _exec(client, f"{SHARED_BUSYBOX} cat /run/kuasar/state/hello")
        result["nic"] = await _add_nic(qemu, client, result["mac"])
        marks["nic_seen"] = time.monotonic() - spawn
        result["migrate_with_vhost_user"] = await _try_migrate(qemu)
        await client.close()
        result["qemu_pss_kb"] = _pss_kb(qemu.proc.pid)
        result["ram_file_used_kb"] = _allocated_kb(ram) if ram_mode == "copy" else None
    except BaseException as e:
        result["error"] = f"{type(e).__name__}: {e}"
        result["console_tail"] = qemu.console.tail(15)
    finally:
        result["timeline_s"] = {k: round(v, 3) for k, v in marks.items()}
        await qemu.close()
        await virtiofsd.stop()
        await transport.close()
        if ram_mode == "copy":
            ram.unlink(missing_ok=True)
    return result


async def _agent(transport: HybridVsock) -> ttrpc.Client:
    """A client to the agent once it answers Check over the hot-plugged device."""
    deadline = time.monotonic() + AGENT_TIMEOUT_S
    while True:
        try:
            client = ttrpc.Client(*await transport.open_connection(AGENT_PORT))
            await client.call(SANDBOX, "Check", pb.CheckRequest(), pb.CheckRequest().__class__, timeout=2.0)
            return client
        except (OSError, asyncio.TimeoutError, ttrpc.RpcError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


async def setup_sandbox(client: ttrpc.Client, hostname: str) -> str:
    """SetupSandbox as the daemon sends it: the agent reseeds its CRNG and mounts the share."""
    request = pb.SetupSandboxRequest()
    request.config.type_url = "PodSandboxConfig"
    request.config.value = json.dumps({"hostname": hostname}).encode()
    try:
        await client.call(SANDBOX, "SetupSandbox", request, empty_pb2.Empty, timeout=30.0)
        return "ok"
    except ttrpc.RpcError as e:
        return f"error: {e}"


async def _exec(client: ttrpc.Client, command: str) -> str:
    try:
        reply = await client.call(SANDBOX, "ExecVMProcess", pb.ExecVMProcessRequest(command=command),
                                  pb.ExecVMProcessResponse, timeout=20.0)
        return reply.out.strip()
    except ttrpc.RpcError as e:
        return f"error: {e}"


async def _add_nic(qemu: Qemu, client: ttrpc.Client, mac: str) -> str:
    """A virtio-net (user-mode backend: the trial needs no tap) hot-plugged with the clone's MAC;
    what the guest then lists as its interfaces' addresses."""
    await qemu.qmp.execute("netdev_add", {"type": "user", "id": "net0"})
    await qemu.qmp.execute("device_add", {"driver": "virtio-net-pci", "id": "nic0", "netdev": "net0",
                                          "mac": mac, "bus": HOTPLUG_NIC_PORTS[0]})
    for _ in range(100):
        seen = await _exec(client, f"{SHARED_BUSYBOX} cat /sys/class/net/eth0/address")
        if not seen.startswith("error"):
            return seen
        await asyncio.sleep(0.05)
    return seen


async def _try_migrate(qemu: Qemu) -> str:
    """QEMU's answer to saving a clone that has the vhost-user devices in (a template with them)."""
    try:
        await snapshot.save(qemu, Path("/dev/null"))
        return "completed"
    except Exception as e:  # QMP's refusal is the measurement
        return str(e)


def _pss_kb(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return None


def _allocated_kb(path: Path) -> int:
    return os.stat(path).st_blocks * 512 // 1024


def trial_config(image: Path):
    """bench.boot's config (hybrid vsock, virtiofs, q35) on `image`, booted with task.debug."""
    config = bench_config(argparse.Namespace(sharefs="virtiofs", machine="q35"))
    config.vm = dataclasses.replace(config.vm, kernel_params="task.debug", kernel=image / "kernel",
                                    initrd=image / "initrd.img")
    return config


async def run(args) -> dict:
    config = trial_config(args.image)
    work = Path(tempfile.mkdtemp(prefix="tmpl-"))
    template = None
    try:
        cold = await cold_boot(config, work)
        template = await make_template(config, work, args.ram)
        clones = [await restore_clone(config, work, template, i, args.ram) for i in range(args.clones)]
        parallel = await asyncio.gather(*(restore_clone(config, work, template, args.clones + i, args.ram, full=False)
                                          for i in range(args.parallel)))
        floor_ = await floor_boot(config, work)
    finally:
        if template:
            Path(template["ram_file"]).unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    def shared(key: str) -> bool | None:
        seen = [c[key] for c in clones if not c.get(key, "error").startswith("error")]
        return len(set(seen)) < len(seen) if len(seen) > 1 else None

    ready = [c["timeline_s"].get("pod_ready_since_request") for c in clones]
    return {"ram": args.ram, "memory_mib": config.vm.memory_mib, "floor": floor_,
            "cold": cold, "template": template, "clones": clones, "parallel": parallel,
            "clone_pod_ready_over_floor": [_ratio(r, floor_["ready_s"]) for r in ready],
            "parallel_slowest_pod_ready_s": max((c["timeline_s"].get("pod_ready_since_request") or float("inf")
                                                for c in parallel), default=None),
            "clones_share_crng_output": shared("kernel_uuid"),
            "clones_share_crng_output_after_setup": shared("kernel_uuid_after_setup")}


def _ratio(a: float | None, b: float) -> float | None:
    return round(a / b, 3) if a is not None else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clones", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=0, help="clones restored at once, after the others")
    parser.add_argument("--ram", choices=["copy", "stream", "private"], default="copy")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE_DIR, help="the guest image's directory")
    print(json.dumps(asyncio.run(run(parser.parse_args())), indent=1))


if __name__ == "__main__":
    main()
