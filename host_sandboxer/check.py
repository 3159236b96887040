"""`vmm-sandboxer check`: boot a throwaway VM from the configured image and call the agent's Check.

A node operator runs it to validate a guest image and the host (QEMU, accel, vsock transport,
shared directory) end to end.  On success it returns one JSON-able dict of measurements; on
failure it raises `VmError` whose stage names what failed (image, config, transport, sharefs,
qemu, agent, check) and whose message ends with the console tail.
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

from host_sandboxer.config import Config, boot_image
from host_sandboxer.vmm.vm import GuestVm, VmError

CHECK_CALLS = 10  # the first call is reported alone (cold), the rest as a median
CHECK_TIMEOUT_S = 10.0


async def run_check(config: Config) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="vmm-check-"))
    share_dir = run_dir / "share"
    share_dir.mkdir(mode=0o700)
    vm = GuestVm(config, run_dir, name="vmm-check", share_dir=share_dir)
    try:
        timeline = await vm.start()
        connect_ms, rtts_ms = await _call_check(vm)
        stopping = time.monotonic()
        await vm.close()
        shutdown_s = time.monotonic() - stopping
    finally:
        await vm.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "ok": True,
        "transport": getattr(vm.transport, "kind", config.vsock.transport),
        "accel": vm.accel.accel,
        "accel_reason": vm.accel.reason,
        "machine": config.vm.machine,
        "sharefs": config.sharefs.type,
        "agent_ready_s": round(timeline.agent_ready_s, 3),
        "connect_ms": round(connect_ms, 2),
        "check_rtt_ms": round(rtts_ms[0], 2),
        "check_rtt_ms_median": round(statistics.median(rtts_ms[1:]), 2),
        "boot": timeline.as_dict(),
        "shutdown_s": round(shutdown_s, 3),
        "kernel": str(config.vm.kernel),
        "image": boot_image(config.vm),
        "image_path": str(config.vm.initrd if boot_image(config.vm) == "initrd" else config.vm.rootfs),
    }


async def _call_check(vm: GuestVm) -> tuple[float, list[float]]:
    """Connect to the agent and call Check CHECK_CALLS times: (connect ms, [rtt ms])."""
    from google.protobuf.empty_pb2 import Empty
    from vmm_common.protos import SANDBOX_SERVICE
    from vmm_common.protos.kuasar.sandbox_pb2 import CheckRequest

    started = time.monotonic()
    try:
        client = await vm.ttrpc_client()
    except Exception as e:
        raise VmError("check", vm.qemu.failure(f"cannot connect to the agent on vsock port "
                                               f"{vm.config.agent.port}: {e!r}")) from None
    connect_ms = (time.monotonic() - started) * 1000
    rtts = []
    try:
        for _ in range(CHECK_CALLS):
            started = time.monotonic()
            await client.call(SANDBOX_SERVICE, "Check", CheckRequest(), Empty, timeout=CHECK_TIMEOUT_S)
            rtts.append((time.monotonic() - started) * 1000)
    except Exception as e:
        raise VmError("check", vm.qemu.failure(f"{SANDBOX_SERVICE}/Check failed: {e}")) from None
    finally:
        await client.close()
    return connect_ms, rtts
