"""Task.Stats: a container's cgroup counters as containerd's cgroups metrics messages
(io.containerd.cgroups.v1.Metrics on cgroup v1, io.containerd.cgroups.v2.Metrics on v2),
filled from the cgroup files the same way containerd's cgroups package reads them."""

import os

from .cgroups import Cgroup, flat_keyed, single_value

# memory.stat (v1) keys whose proto field is spelled differently
_V1_MEMORY_RENAMES = {"pgpgin": "pg_pg_in", "pgpgout": "pg_pg_out", "pgfault": "pg_fault",
                      "pgmajfault": "pg_maj_fault", "hierarchical_memsw_limit":
                      "hierarchical_swap_limit"}


def metrics(cgroup: Cgroup):
    return _metrics_v2(cgroup) if cgroup.version == 2 else _metrics_v1(cgroup)


def _fill_by_name(message, values: dict[str, int], renames: dict[str, str] = {}) -> None:
    """Set each integer field of `message` named like a key of `values` (after `renames`)."""
    fields = message.DESCRIPTOR.fields_by_name
    for key, value in values.items():
        name = renames.get(key, key)
        if key.startswith("total_"):
            name = "total_" + renames.get(key[6:], key[6:])
        field = fields.get(name)
        if field is not None and field.message_type is None and value >= 0:
            setattr(message, name, value)


def _metrics_v1(cg: Cgroup):
    from vmm_common.protos.io.containerd.cgroups.v1 import metrics_pb2 as m1
    out = m1.Metrics()
    out.pids.current = single_value(cg.read("pids", "pids.current"))
    out.pids.limit = single_value(cg.read("pids", "pids.max"))

    usage = out.cpu.usage
    usage.total = single_value(cg.read("cpuacct", "cpuacct.usage"))
    usage.per_cpu.extend(int(v) for v in (cg.read("cpuacct", "cpuacct.usage_percpu") or "").split())
    ticks = flat_keyed(cg.read("cpuacct", "cpuacct.stat"))
    nanos_per_tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    usage.user = ticks.get("user", 0) * nanos_per_tick
    usage.kernel = ticks.get("system", 0) * nanos_per_tick
    throttle = flat_keyed(cg.read("cpu", "cpu.stat"))
    out.cpu.throttling.periods = throttle.get("nr_periods", 0)
    out.cpu.throttling.throttled_periods = throttle.get("nr_throttled", 0)
    out.cpu.throttling.throttled_time = throttle.get("throttled_time", 0)

    memory = out.memory
    _fill_by_name(memory, flat_keyed(cg.read("memory", "memory.stat")), _V1_MEMORY_RENAMES)
    for entry, prefix in ((memory.usage, "memory."), (memory.swap, "memory.memsw."),
                          (memory.kernel, "memory.kmem."), (memory.kernel_tcp, "memory.kmem.tcp.")):
        entry.usage = single_value(cg.read("memory", prefix + "usage_in_bytes"))
        entry.max = single_value(cg.read("memory", prefix + "max_usage_in_bytes"))
        entry.limit = single_value(cg.read("memory", prefix + "limit_in_bytes"))
        entry.failcnt = single_value(cg.read("memory", prefix + "failcnt"))
    oom = flat_keyed(cg.read("memory", "memory.oom_control"))
    out.memory_oom_control.oom_kill_disable = oom.get("oom_kill_disable", 0)
    out.memory_oom_control.under_oom = oom.get("under_oom", 0)
    out.memory_oom_control.oom_kill = oom.get("oom_kill", 0)

    for name, field in (("blkio.throttle.io_service_bytes", "io_service_bytes_recursive"),
                        ("blkio.throttle.io_serviced", "io_serviced_recursive")):
        for line in (cg.read("blkio", name) or "").splitlines():
            parts = line.split()
            if len(parts) == 3 and ":" in parts[0]:
                major, minor = parts[0].split(":")
                getattr(out.blkio, field).add(op=parts[1], major=int(major), minor=int(minor),
                                              value=int(parts[2]))
    return out


def _metrics_v2(cg: Cgroup):
    from vmm_common.protos.io.containerd.cgroups.v2 import metrics_pb2 as m2
    out = m2.Metrics()
    out.pids.current = single_value(cg.read("", "pids.current"))
    out.pids.limit = single_value(cg.read("", "pids.max"))

    cpu = flat_keyed(cg.read("", "cpu.stat"))
    _fill_by_name(out.cpu, cpu)

    stat = flat_keyed(cg.read("", "memory.stat"))
    for kind in ("refault", "activate", "nodereclaim"):  # 5.9+ split these by anon/file
        key = "workingset_" + kind
        stat.setdefault(key, stat.get(key + "_anon", 0) + stat.get(key + "_file", 0))
    _fill_by_name(out.memory, stat)
    out.memory.usage = single_value(cg.read("", "memory.current"))
    out.memory.usage_limit = single_value(cg.read("", "memory.max"))
    out.memory.swap_usage = single_value(cg.read("", "memory.swap.current"))
    out.memory.swap_limit = single_value(cg.read("", "memory.swap.max"))
    out.memory.max_usage = single_value(cg.read("", "memory.peak"))
    _fill_by_name(out.memory_events, flat_keyed(cg.read("", "memory.events")))

    for line in (cg.read("", "io.stat") or "").splitlines():
        parts = line.split()
        if not parts or ":" not in parts[0]:
            continue
        major, minor = parts[0].split(":")
        values = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
        out.io.usage.add(major=int(major), minor=int(minor),
                         **{k: int(values[k]) for k in ("rbytes", "wbytes", "rios", "wios")
                            if values.get(k, "").isdigit()})
    return out
