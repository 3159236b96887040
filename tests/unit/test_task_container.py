"""The container layer's pure parts: ID rules, mount options, pod namespace rewriting, stdio
address parsing, cgroup v1/v2 metrics and the v2 OOM watcher. Cgroup files are real files in a
directory laid out like a cgroup (this host runs cgroup v1, so the v2 readers are exercised here
on the kernel's file formats; tests/vm runs them on a real cgroup2 mount)."""
import asyncio
import os

import pytest

from vmm_task.container import stats
from vmm_task.container.cgroups import Cgroup, flat_keyed, single_value
from vmm_task.container.endpoints import PathEndpoint, parse_endpoint
from vmm_task.container.errors import TaskError
from vmm_task.container.fdcopy import Pump
from vmm_task.container.ids import check_id
from vmm_task.container.mounts import MS_BIND, MS_NOSUID, MS_PRIVATE, MS_RDONLY, MS_REC, parse_options
from vmm_task.container.oom import OomWatcher
from vmm_task.container.runtime import root_is_ramfs
from vmm_task.container.spec import add_pod_files, apply_pod_namespaces


@pytest.mark.parametrize("good", ["a", "A1", "abc.def_ghi-0", "9" * 128])
def test_ids_accepted(good):
    assert check_id("container", good) == good


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "a/b", "-a", "_a", "x" * 129, "a\0", "a b"])
def test_ids_rejected_with_the_kind_named(bad):
    with pytest.raises(TaskError) as caught:
        check_id("exec", bad)
    assert caught.value.code == "INVALID_ARGUMENT" and "invalid exec id" in str(caught.value)


def test_mount_options_split_into_flags_propagation_and_data():
    flags, propagation, data = parse_options(
        ["ro", "nosuid", "rbind", "rprivate", "lowerdir=/a:/b", "upperdir=/u", "index=off"])
    assert flags == MS_RDONLY | MS_NOSUID | MS_BIND | MS_REC
    assert propagation == MS_PRIVATE | MS_REC
    assert data == "lowerdir=/a:/b,upperdir=/u,index=off"
    assert parse_options(["ro", "rw"])[0] == 0  # the later option wins


def test_pod_namespaces_replace_ipc_uts_and_pid_only_when_shared():
    spec = {"linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "mount"},
                                     {"type": "uts", "path": "/proc/1/ns/uts"}]}}
    pod = {"ipc": "/run/ns/ipc", "uts": "/run/ns/uts", "pid": None}
    assert apply_pod_namespaces(spec, pod)
    namespaces = {ns["type"]: ns.get("path") for ns in spec["linux"]["namespaces"]}
    assert namespaces == {"pid": None, "mount": None, "ipc": "/run/ns/ipc", "uts": "/run/ns/uts"}
    assert not apply_pod_namespaces(spec, pod)  # applying again changes nothing
    assert apply_pod_namespaces(spec, dict(pod, pid="/run/ns/pid"))
    assert {"type": "pid", "path": "/run/ns/pid"} in spec["linux"]["namespaces"]
    named = {"hostname": "c1", "linux": {"namespaces": []}}
    assert apply_pod_namespaces(named, pod) and "hostname" not in named
    untouched = {"hostname": "c2", "linux": {"namespaces": [{"type": "ipc"}]}}
    assert not apply_pod_namespaces(untouched, {"ipc": None, "uts": None, "pid": None})
    assert untouched["hostname"] == "c2"


def test_pod_files_are_bound_unless_the_spec_mounts_them():
    spec = {"mounts": [{"destination": "/etc/hosts", "type": "bind", "source": "/shared/hosts"}]}
    files = {"/etc/hosts": "/run/pod/hosts", "/etc/resolv.conf": "/run/pod/resolv.conf"}
    assert add_pod_files(spec, files)
    assert spec["mounts"][0]["source"] == "/shared/hosts"  # CRI's own mount wins
    assert spec["mounts"][1] == {"destination": "/etc/resolv.conf", "type": "bind",
                                 "source": "/run/pod/resolv.conf", "options": ["rbind", "ro"]}
    assert not add_pod_files(spec, files)


def test_stdio_addresses():
    for uri in ("/run/x/stdout", "fifo:///run/x/stdout", "file:///run/x/stdout"):
        endpoint = parse_endpoint("stdout", uri)
        assert isinstance(endpoint, PathEndpoint) and endpoint.path == "/run/x/stdout"
    for bad in ("relative/path", "vsock://", "vsock://1:x", "vsock://0", "vsock://2:4294967296",
                "vsock://5?acked", "vsock://5?", "vsock://?ack", "unix://relative?ack", "unix://"):
        with pytest.raises(TaskError) as caught:
            parse_endpoint("stderr", bad)
        assert caught.value.code == "INVALID_ARGUMENT" and "stderr" in str(caught.value)


def test_unix_stdio_listeners_plain_and_acknowledged(tmp_path):
    plain = parse_endpoint("stdout", f"unix://{tmp_path}/plain")
    acked = parse_endpoint("stdout", f"unix://{tmp_path}/acked?ack")
    assert (plain.acked, acked.acked) == (False, True)
    for endpoint in (plain, acked):
        endpoint.close()
    assert list(tmp_path.iterdir()) == [], "a closed listener leaves no socket file"


def _write(directory, files: dict[str, str]):
    for name, text in files.items():
        (directory / name).write_text(text)


def test_cgroup_v2_metrics_from_the_kernel_formats(tmp_path):
    _write(tmp_path, {
        "pids.current": "3\n", "pids.max": "max\n",
        "cpu.stat": "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\n",
        "memory.stat": "anon 4096\nfile 8192\nworkingset_refault_anon 2\n"
                       "workingset_refault_file 5\npgfault 77\n",
        "memory.current": "12288\n", "memory.max": "268435456\n", "memory.peak": "20480\n",
        "memory.events": "low 0\nhigh 0\nmax 4\noom 2\noom_kill 1\n",
        "io.stat": "8:0 rbytes=4096 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n",
    })
    metrics = stats.metrics(Cgroup(2, {"": str(tmp_path)}))
    assert (metrics.pids.current, metrics.pids.limit) == (3, 0)
    assert (metrics.cpu.usage_usec, metrics.cpu.user_usec, metrics.cpu.system_usec) == (1500, 1000, 500)
    assert (metrics.memory.anon, metrics.memory.file, metrics.memory.pgfault) == (4096, 8192, 77)
    assert metrics.memory.workingset_refault == 7
    assert (metrics.memory.usage, metrics.memory.usage_limit, metrics.memory.max_usage) == \
        (12288, 268435456, 20480)
    assert (metrics.memory_events.max, metrics.memory_events.oom_kill) == (4, 1)
    entry = metrics.io.usage[0]
    assert (entry.major, entry.minor, entry.rbytes, entry.rios) == (8, 0, 4096, 1)


def test_cgroup_v1_metrics_from_the_kernel_formats(tmp_path):
    dirs = {}
    for controller in ("memory", "cpuacct", "cpu", "pids", "blkio"):
        dirs[controller] = str(tmp_path / controller)
        os.mkdir(dirs[controller])
    _write(tmp_path / "memory", {
        "memory.stat": "cache 10\nrss 20\npgpgin 3\ntotal_pgfault 9\nhierarchical_memory_limit 99\n",
        "memory.usage_in_bytes": "300\n", "memory.max_usage_in_bytes": "400\n",
        "memory.limit_in_bytes": "500\n", "memory.failcnt": "1\n",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"})
    _write(tmp_path / "cpuacct", {"cpuacct.usage": "123456\n", "cpuacct.usage_percpu": "100 23\n",
                                  "cpuacct.stat": "user 2\nsystem 1\n"})
    _write(tmp_path / "cpu", {"cpu.stat": "nr_periods 5\nnr_throttled 1\nthrottled_time 7\n"})
    _write(tmp_path / "pids", {"pids.current": "2\n", "pids.max": "64\n"})
    _write(tmp_path / "blkio", {"blkio.throttle.io_service_bytes": "8:0 Read 512\nTotal 512\n"})
    metrics = stats.metrics(Cgroup(1, dirs))
    memory = metrics.memory
    assert (memory.cache, memory.rss, memory.pg_pg_in, memory.total_pg_fault) == (10, 20, 3, 9)
    assert memory.hierarchical_memory_limit == 99
    assert (memory.usage.usage, memory.usage.max, memory.usage.limit, memory.usage.failcnt) == \
        (300, 400, 500, 1)
    assert metrics.memory_oom_control.oom_kill == 2
    assert metrics.cpu.usage.total == 123456 and list(metrics.cpu.usage.per_cpu) == [100, 23]
    assert metrics.cpu.usage.user == 2 * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    assert metrics.cpu.throttling.throttled_time == 7
    assert (metrics.pids.current, metrics.pids.limit) == (2, 64)
    entry = metrics.blkio.io_service_bytes_recursive[0]
    assert (entry.op, entry.major, entry.value) == ("Read", 8, 512)


def test_flat_keyed_and_single_value_tolerate_odd_lines():
    assert flat_keyed("a 1\nbad\nb -2\nc x\n") == {"a": 1, "b": -2}
    assert single_value(None) == 0 and single_value("max\n") == 0 and single_value("42") == 42


def _watch_v2_oom(tmp_path, steps) -> tuple[list, object]:
    """(the OOM kills a v2 watcher of tmp_path/memory.events reported, what `steps(watcher,
    events_file, reported)` returned), the watcher closed after the steps."""
    events = tmp_path / "memory.events"
    events.write_text("oom 0\noom_kill 0\n")
    seen = []

    async def scenario():
        watcher = OomWatcher(Cgroup(2, {"": str(tmp_path)}), lambda: seen.append(1))
        try:
            return await steps(watcher, events, seen)
        finally:
            watcher.close()

    result = asyncio.run(scenario())
    return seen, result


def test_v2_oom_watcher_counts_oom_kills_from_memory_events(tmp_path):
    async def steps(watcher, events, reported):
        events.write_text("oom 1\noom_kill 2\n")
        for _ in range(100):
            if len(reported) == 2:
                break
            await asyncio.sleep(0.01)
        events.write_text("oom 1\noom_kill 2\nlow 1\n")
        await asyncio.sleep(0.1)  # a change without a new kill reports nothing

    seen, _ = _watch_v2_oom(tmp_path, steps)
    assert seen == [1, 1]


def test_v2_oom_catch_up_reports_a_kill_before_its_notification_and_only_once(tmp_path):
    """The Task service calls catch_up before it publishes an exit: the kill the kernel counted
    is reported then, not when the (deferred) inotify event arrives, and not twice."""
    async def steps(watcher, events, reported):
        events.write_text("oom 1\noom_kill 1\n")
        watcher.catch_up()  # before the loop has run the inotify reader
        reported_at_once = len(reported)
        await asyncio.sleep(0.2)  # the inotify event comes, with no new kill
        events.unlink()  # the cgroup is gone
        watcher.catch_up()
        watcher.close()
        watcher.catch_up()  # closed: nothing to do
        return reported_at_once

    seen, reported_at_once = _watch_v2_oom(tmp_path, steps)
    assert reported_at_once == 1
    assert seen == [1]


def test_root_is_ramfs(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text("1 0 0:2 / / rw - rootfs rootfs rw\n22 1 0:20 / /proc rw - proc proc rw\n")
    assert root_is_ramfs(str(info))
    info.write_text("22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n")
    assert not root_is_ramfs(str(info))


def test_pump_keeps_draining_when_the_reader_goes_away():
    async def scenario():
        src_r, src_w = os.pipe()
        dst_r, dst_w = os.pipe()
        for fd in (src_r, dst_w):
            os.set_blocking(fd, False)
        os.close(dst_r)  # the reader is gone before anything is written
        pump = Pump("stdout")
        task = asyncio.ensure_future(pump.run(src_r, dst_w))
        os.write(src_w, b"x" * 60_000)  # below the pipe capacity: never blocks
        os.close(src_w)
        await asyncio.wait_for(task, 5)
        for fd in (src_r, dst_w):
            os.close(fd)
        return pump

    pump = asyncio.run(scenario())
    assert pump.copied == 0 and "Broken pipe" in pump.error
