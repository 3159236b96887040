"""Pod metrics for Controller.Metrics: the VMM process's CPU and memory, cgroup-v2 shaped.

The VMM (QEMU) is the pod on the host: its CPU time is the pod's CPU time and its resident
memory the pod's memory (guest RAM is a shared memfd, counted as shmem). They are read from
/proc/<pid> and reported as io.containerd.cgroups.v2.Metrics, the type CRI's sandbox stats
decode.
"""

import os
import time

from google.protobuf import any_pb2, timestamp_pb2

from vmm_common.protos.containerd.types import metrics_pb2
from vmm_common.protos.io.containerd.cgroups.v2 import metrics_pb2 as cgroups_v2

_TICK_USEC = 1_000_000 // os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _status_kib(pid: int) -> dict[str, int]:
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                values[key] = int(parts[0]) * 1024
            elif key == "Threads":
                values[key] = int(parts[0])
    return values


def vmm_metrics(sandbox_id: str, pid: int, memory_limit_bytes: int) -> metrics_pb2.Metric:
    """Metric for the pod whose VMM is `pid`; raises ProcessLookupError if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        status = _status_kib(pid)
    except FileNotFoundError:
        raise ProcessLookupError(f"VMM process {pid} of pod {sandbox_id} is gone") from None
    user_usec, system_usec = int(fields[11]) * _TICK_USEC, int(fields[12]) * _TICK_USEC
    data = cgroups_v2.Metrics(
        pids=cgroups_v2.PidsStat(current=status.get("Threads", 0)),
        cpu=cgroups_v2.CPUStat(usage_usec=user_usec + system_usec, user_usec=user_usec,
                               system_usec=system_usec),
        memory=cgroups_v2.MemoryStat(
            usage=status.get("VmRSS", int(fields[21]) * _PAGE),
            max_usage=status.get("VmHWM", 0),
            anon=status.get("RssAnon", 0), file=status.get("RssFile", 0),
            shmem=status.get("RssShmem", 0), usage_limit=memory_limit_bytes),
    )
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(time.time_ns())
    packed = any_pb2.Any(type_url=data.DESCRIPTOR.full_name, value=data.SerializeToString())
    return metrics_pb2.Metric(timestamp=stamp, id=sandbox_id, data=packed)
