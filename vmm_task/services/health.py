"""vmmtask.v1.Health: is the agent serving, what is it, and how is it doing (for the host and
for tests: the zombie and reaped counts show the reaper at work). Check("sharefs") asks whether
the shared directory's server on the host still answers (the daemon's periodic probe)."""

import os
import sys
import time

from google.protobuf import empty_pb2

from vmm_common.protos.vmmtask.v1 import health_pb2 as pb
from vmm_task import __version__, procfs
from vmm_task.init import cpu_hotplug

SERVICE = "vmmtask.v1.Health"
SHAREFS = "sharefs"  # Check's name for the shared directory's server (vmm_task/sharefs_probe.py)
SHAREFS_TIMEOUT_S = 5.0


def register(server, ctx) -> None:
    from vmm_common import ttrpc

    sharefs = None

    async def check(request: pb.HealthCheckRequest, _call) -> pb.HealthCheckResponse:
        nonlocal sharefs
        if request.service == SHAREFS:
            if sharefs is None:
                from vmm_task.sharefs_probe import SharefsProbe
                sharefs = SharefsProbe(ctx.state_dir)
            reason = await sharefs.check(SHAREFS_TIMEOUT_S)
            return pb.HealthCheckResponse(status=pb.HealthCheckResponse.NOT_SERVING if reason
                                          else pb.HealthCheckResponse.SERVING, reason=reason)
        status = pb.HealthCheckResponse.SERVING
        if request.service and request.service not in ctx.services:
            status = pb.HealthCheckResponse.SERVICE_UNKNOWN
        return pb.HealthCheckResponse(status=status)

    async def version(_request, _call) -> pb.VersionResponse:
        return pb.VersionResponse(agent_version=__version__, python_version=sys.version.split()[0],
                                  mode="dev" if ctx.dev_mode else "pid1", runtime=ctx.runtime)

    async def status(_request, _call) -> pb.StatusResponse:
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
        return pb.StatusResponse(
            pid=os.getpid(), agent_uptime_s=now - ctx.started_boottime,
            started_at_uptime_s=ctx.started_boottime, rss_bytes=procfs.rss_bytes(),
            zombies=procfs.count_zombie_children(os.getpid()),
            reaped_total=ctx.reaper.reaped_total, pending_waits=ctx.reaper.pending,
            events_queued=len(ctx.events), events_dropped=ctx.events.dropped_total,
            boot_problems=ctx.boot_problems, debug=ctx.debug, online_cpus=cpu_hotplug.online_count())

    server.register(SERVICE, {
        "Check": ttrpc.unary(pb.HealthCheckRequest, check),
        "Version": ttrpc.unary(empty_pb2.Empty, version),
        "Status": ttrpc.unary(empty_pb2.Empty, status),
    })
