"""VM templates in the daemon ([vm] template = true, docs/templates.md): two pods started
through the daemon's own path are restored from one template, and are distinct guests: their
kernels' random bytes differ, each NIC carries its pod's MAC, each share serves its own files;
a daemon killed and restarted takes a clone over; a clone's RAM file goes with its pod.

Real daemon, QEMU (TCG), virtiofsd, vsock backend, busybox containers in network namespaces
(bench/netpod.py, as tests/vm/test_network_vm.py). Every guest's vsock CID is 3 here, cold
booted or not: the daemon's hybrid vsock backend gives each VM a link of its own.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from qemu.qmp import Runstate

from bench.netpair import NetnsPair
from bench.netpod import Daemon, NetPod, demo
from bench.template_trial import setup_sandbox
from host_sandboxer.vmm.template import TemplateStore
from host_sandboxer.vmm.vm import GuestVm
from leak_guard import fail_if_left, stop_daemon
from vmm_common.protos.kuasar import sandbox_pb2 as pb

pytestmark = [pytest.mark.vm, pytest.mark.skipif(os.geteuid() != 0, reason="netns and mounts need root")]
# What a container prints: 16 bytes of its kernel's CRNG, its NIC's MAC, and a file the host
# wrote into the pod's share (the bundle's /etc/hostname: the container's ID).
PROBE = "cat /proc/sys/kernel/random/uuid /sys/class/net/eth0/address /etc/hostname"


@pytest.fixture
def daemon(guest_image):
    # VMM_TASK_TEST_TEMPLATE=1 puts the line in already (scripts/demo.py).
    d = Daemon(guest_image.kernel, guest_image.initrd, "" if demo.template_line() else "template = true\n")
    yield d
    left = stop_daemon(d.daemon, d.work)  # and the template's RAM, which outlives the daemon
    d.close()
    fail_if_left(left)


def _probe(pod: NetPod, cid: str) -> list[str]:
    out, err, status = pod.run(cid, PROBE)
    assert status == 0, err
    return out.split()


def test_two_pods_from_one_template_differ_and_their_ram_goes_with_them(daemon):
    store = TemplateStore(daemon.daemon.state)
    with NetnsPair() as first, NetnsPair() as second:
        pods = []
        try:
            for name, pair in (("tpl-a", first), ("tpl-b", second)):
                pods.append(NetPod(daemon, pair, name))
            infos = [daemon.info(pod.id) for pod in pods]
            assert infos[0]["boot_template"] == infos[1]["boot_template"], infos  # restored, one template
            # the restore's own Check was the agent's only one (no second before SetupSandbox)
            assert all("check_s" not in info and "setup_sandbox_s" in info for info in infos), infos
            # the template's agent imported a pod's modules before it was saved (task.preload)
            consoles = [p.read_text(errors="replace") for p in store.dir.glob("*/console.log")]
            assert any("task.preload: a pod's modules imported" in text for text in consoles), consoles
            assert {f"vmm-{pod.id}.ram" for pod in pods} <= {p.name for p in store.ram_dir.iterdir()}
            seen = {}
            for pod, pair in zip(pods, (first, second)):
                uuid, mac, hostname = _probe(pod, f"probe-{pod.id}")
                assert mac == pair.mac(pair.pod)
                assert hostname == f"probe-{pod.id}"
                seen[pod.id] = (uuid, mac)
            assert seen["tpl-a"][0] != seen["tpl-b"][0]
            assert seen["tpl-a"][1] != seen["tpl-b"][1]

            daemon.daemon.proc.kill()  # a crash: the new daemon takes the clones over
            daemon.daemon.proc.wait()
            daemon.daemon.start()
            uuid, mac, _ = _probe(pods[0], "after-restart")
            assert mac == first.mac(first.pod) and uuid not in (seen["tpl-a"][0], seen["tpl-b"][0])
        finally:
            for pod in pods:
                pod.remove()
    assert [p.name for p in store.ram_dir.iterdir() if p.name.startswith("vmm-")] == []


def _each_clone_runs(config, vm_loop, command: str, clones: int = 2) -> list[str]:
    """`command`'s output in each of `clones` clones restored by GuestVm.start (the daemon's
    path) from one template, before SetupSandbox (ExecVMProcess: the debug image's busybox)."""
    config.vm = dataclasses.replace(config.vm, template=True)
    config.agent = dataclasses.replace(config.agent, debug=True)  # ExecVMProcess
    work = Path(tempfile.mkdtemp(prefix="tpl-"))  # short: unix socket paths
    store = TemplateStore(work)

    async def run_in_each() -> list[str]:
        vms, outputs = [], []
        try:
            for index in range(clones):
                vms.append(GuestVm(config, work / f"c{index}", name=f"clone{index}", templates=store))
                await vms[-1].start()
                client = await vms[-1].ttrpc_client()
                try:
                    reply = await client.call("grpc.SandboxService", "ExecVMProcess", pb.ExecVMProcessRequest(
                        command=command), pb.ExecVMProcessResponse, timeout=30)
                finally:
                    await client.close()
                outputs.append(reply.out.strip())
            return outputs
        finally:
            for vm in vms:
                await vm.close()

    try:
        return vm_loop.run(run_in_each(), timeout=300)
    finally:
        shutil.rmtree(store.ram_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def test_clones_differ_in_random_bytes_before_setup_sandbox(debug_vm_config, vm_loop):
    """The guest kernel reseeds its CRNG on the restore itself (vmgenid), before SetupSandbox,
    whose reseed by the agent would hide a kernel that did not: two clones print different
    UUIDs straight away. Without the driver they printed the same in 5 of 6 trials
    (docs/templates.md). The debug image has the `cat`."""
    first, second = _each_clone_runs(debug_vm_config, vm_loop, "/bin/cat /proc/sys/kernel/random/uuid")
    assert first != second, first


def test_a_clones_first_hwrng_bytes_are_the_templates_and_the_seed_skips_them(debug_vm_config, vm_loop):
    """virtio-rng keeps up to 64 bytes fetched ahead in guest RAM: when the template was saved
    with them, every clone reads them first (measured: 3 clones, the same first 64 bytes, then
    different; with another template none: its buffer was empty when saved). Whatever the
    template held, the bytes after entropy.STALE_BYTES, which the agent's reseed credits, are
    each clone's own."""
    from vmm_task.pod import entropy

    size = entropy.STALE_BYTES + entropy.SEED_BYTES
    outputs = _each_clone_runs(debug_vm_config, vm_loop, f"head -c {size} /dev/hwrng | od -An -v -tx1", clones=3)
    bytes_of = [bytes.fromhex("".join(out.split())) for out in outputs]
    assert [len(b) for b in bytes_of] == [size] * 3
    shared = next(i for i in range(size) if len({b[i] for b in bytes_of}) > 1)  # the template's part
    assert shared <= entropy.STALE_BYTES, shared
    assert len({b[entropy.STALE_BYTES:] for b in bytes_of}) == 3


def test_a_clone_is_restored_while_its_device_backends_start(vm_config, vm_loop):
    """The restore (RAM copy, QEMU's spawn, the state loaded) does not wait for the pod's vsock
    link and virtiofsd, which only the hot-plugged devices need: here they are held back until
    the restored guest runs, and the clone still comes up with both (its agent answers over the
    vsock device; SetupSandbox mounts the share). Sequential, the start would wait forever."""
    config = vm_config
    config.vm = dataclasses.replace(config.vm, template=True)
    work = Path(tempfile.mkdtemp(prefix="tpl-"))  # short: unix socket paths
    store = TemplateStore(work)
    share = work / "share"
    share.mkdir()

    async def start_with_backends_held_back() -> str:
        vm = GuestVm(config, work / "vm", name="held", share_dir=share, templates=store)
        start_backends = vm._start_backends

        async def after_the_restore():
            while vm.qemu is None or vm.qemu.qmp.runstate != Runstate.RUNNING or await vm.qemu.status() != "running":
                await asyncio.sleep(0.01)
            return await start_backends()

        vm._start_backends = after_the_restore
        try:
            await asyncio.wait_for(vm.start(), 120)
            client = await vm.ttrpc_client()
            try:
                return await setup_sandbox(client, "held-back")
            finally:
                await client.close()
        finally:
            await vm.close()

    try:
        assert vm_loop.run(start_with_backends_held_back(), timeout=300) == "ok"
    finally:
        shutil.rmtree(store.ram_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
