"""A hostile guest next to a bystander pod, on one daemon and one vsock backend (issue 13).

The attacker is a privileged container (every capability: root of the guest in its own
namespaces, AF_VSOCK to the host included). What it does, all at once:
- vsock with the guest kernel's own driver (tests/vm/hostile_vsock.c): thousands of connects to
  the host's ports, rounds of connects closed unanswered (an RST each). A guest program cannot
  write virtqueue descriptors; a hostile guest kernel's malformed rings are played against the
  real backend process by tests/unit/test_vsock_backend_hostile.py;
- it mounts the pod's share (virtiofs) itself and fills its writable area, and writes the
  share's read-only top;
- it remounts its read-only volume writable and writes;
- a second container OOMs in a loop (a TaskOOM event each time: the events a guest can make);
- a third writes its stdout as fast as it can while the host does not read it, then all of it
  is read, and never reads its stdin while the host writes.
Meanwhile the bystander pod's container writes numbered lines and the host execs into it
every second. The bystander's output must be complete and in order, its execs answered in
bounded time, its exit event published; every attack must get an error; the daemon's, the
backend's and the task relay's memory (Pss) must stay bounded.

Real daemon, QEMU (TCG), virtiofsd, vsock backend (as its own uid), guest kernel and crun.
"""
import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from test_sandboxer import NS, demo, env  # noqa: F401  (env: the fixture)
from test_sandboxer_restart import _exec

from vmm_common import ttrpc
from vmm_common.protos.containerd.events import task_pb2 as events
from vmm_common.protos.containerd.task.v3 import shim_pb2 as task

pytestmark = [pytest.mark.vm, pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")]

PROGRAM = Path(__file__).resolve().parent / "hostile_vsock.c"
LINES = 400                   # the bystander's output, one line every 50 ms (+ TCG's slowness)
FLOOD_BYTES = 8 << 20         # the attacker's stdout, written as fast as it can
HOLD_S = 10.0                 # ... while the host does not read it
FILL_LIMIT_MIB = 8            # [sharefs] tmpfs_size_mib (default 32: the same, slower under TCG)
PSS_GROWTH_MIB = 32           # what each host process may grow by under attack
EXEC_BOUND_S = 15.0           # an exec into the bystander, under TCG on a loaded 2-core host
MIB = 1 << 20
ALL_CAPS = ["CAP_" + name.upper() for name in (
    "chown dac_override dac_read_search fowner fsetid kill setgid setuid setpcap linux_immutable "
    "net_bind_service net_broadcast net_admin net_raw ipc_lock ipc_owner sys_module sys_rawio "
    "sys_chroot sys_ptrace sys_pacct sys_admin sys_boot sys_nice sys_resource sys_time "
    "sys_tty_config mknod lease audit_write audit_control setfcap mac_override mac_admin syslog "
    "wake_alarm block_suspend audit_read perfmon bpf checkpoint_restore").split()]

ATTACK = r"""
try() {  # "<what>: ok", or the end of the first line of its error
  if out=$(sh -c "$2" 2>&1); then echo "$1: ok"; else echo "$1: $(echo "$out" | head -n 1 | sed 's/.*: //')"; fi
}
/hostile_vsock flood 500
/hostile_vsock storm 10 200
mkdir /share && mount -t virtiofs kuasar /share && echo "share: mounted"
try fill "dd if=/dev/zero of=/share/attacker/fill bs=1M count=64"
echo "filled: $(($(stat -c %s /share/attacker/fill) / 1048576)) MiB"
rm /share/attacker/fill
try share-top "echo guest > /share/new"
mount -o remount,bind,rw /ro && echo "ro: remounted"
try ro-volume "echo guest >> /ro/file"
"""


def _pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))


class Watch:
    """Samples the Pss of the host's processes until stopped; the largest seen, per process."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.base = {name: _pss_kib(pid) for name, pid in pids.items()}
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.25):
            for name, pid in self.pids.items():
                with contextlib.suppress(OSError):  # gone: what the test asserts on then says why
                    self.peak[name] = max(self.peak[name], _pss_kib(pid))

    def stop(self) -> dict[str, tuple[int, int]]:
        """(base, peak) MiB per process."""
        self._stop.set()
        self._thread.join()
        return {name: (self.base[name] // 1024, self.peak[name] // 1024) for name in self.pids}


class HeldReader(demo.FifoReader):
    """A FIFO opened for reading at once (the daemon may open it to write), read only once
    `release()` is called: a client that does not take what the guest writes."""

    def __init__(self, path: str):
        self.released = threading.Event()
        super().__init__(path)

    def _run(self):
        try:
            with open(self.path, "rb", buffering=0) as f:
                self.released.wait()
                while chunk := f.read(65536):
                    self.data += chunk
        except OSError as exc:
            self._error = exc

    def release(self) -> None:
        self.released.set()


def _fill_stdin(path: str, stop: threading.Event, accepted: list[int]) -> None:
    """Writes into a FIFO nobody in the guest reads, without blocking, until `stop`: how much
    the host takes (FIFO, daemon, vsock credit, guest pipe) before it pushes back."""
    fd = None
    while fd is None and not stop.is_set():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            time.sleep(0.05)
    chunk = b"x" * 65536
    try:
        while not stop.wait(0.01):
            try:
                accepted[0] += os.write(fd, chunk)
            except BlockingIOError:
                pass
            except BrokenPipeError:
                return
    finally:
        if fd is not None:
            os.close(fd)


def _start(tasks, bundle, **stdio):
    tasks.Create(task.CreateTaskRequest(id=bundle.id, bundle=str(bundle.path), rootfs=bundle.rootfs, **stdio),
                 metadata=NS, timeout=60)
    tasks.Start(task.StartRequest(id=bundle.id), metadata=NS, timeout=60)


def _end(tasks, bundle, kill: bool = False) -> int:
    if kill:
        with contextlib.suppress(ttrpc.RpcError):  # it may have ended (the OOM killer may take its shell)
            tasks.Kill(task.KillRequest(id=bundle.id, signal=signal.SIGKILL, all=True), metadata=NS, timeout=30)
    status = tasks.Wait(task.WaitRequest(id=bundle.id), metadata=NS, timeout=120).exit_status
    tasks.Delete(task.DeleteRequest(id=bundle.id), metadata=NS, timeout=60)
    return status


def _timed_exec(tasks, bundle, exec_id: str) -> float:
    """Seconds an exec of `echo pong` takes, from Exec to its output and exit status."""
    before = time.monotonic()
    assert _exec(tasks, bundle, exec_id, ["echo", "pong"]) == (b"pong\n", 0)
    return time.monotonic() - before


def _helper_pid(env, name: str) -> int:
    return json.loads((env.daemon.state / f"{name}.json").read_text())["pid"]


def _published(env, topic: str, message_type, predicate, timeout: float = 20.0) -> list:
    """The events of `topic` published so far that match, waiting up to `timeout` for one."""
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for _, seen, event in list(env.events.stream):
            if seen == topic:
                message = message_type.FromString(event.value)
                if predicate(message):
                    found.append(message)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


@pytest.mark.parametrize("env", [{"settings": {"sharefs": f"tmpfs_size_mib = {FILL_LIMIT_MIB}"}}], indirect=True)
def test_a_hostile_guest_costs_the_other_pod_nothing(env, tmp_path):
    calm_pod, hostile_pod = env.cri.run_pod("calm"), env.cri.run_pod("hostile")
    calm, hostile = demo.Cri.task_client(calm_pod.address), demo.Cri.task_client(hostile_pod.address)
    watch = Watch({"daemon": env.daemon.proc.pid, "vsock backend": _helper_pid(env, "vsock-backend"),
                   "task relay": _helper_pid(env, "task-relay")})

    # The bystander: numbered lines, and execs answered throughout.
    counter = env.bundle("count", ["sh", "-c", f"i=0; while [ $i -lt {LINES} ]; do echo $i; i=$((i+1)); "
                                               "usleep 50000; done"], calm_pod.pid)
    counter_out = counter.fifo("out")
    counted = demo.FifoReader(counter_out)
    _start(calm, counter, stdout=counter_out)
    service = env.bundle("service", ["sleep", "1000"], calm_pod.pid)
    _start(calm, service)

    # The attacker, privileged, with a read-only volume and the vsock program in its rootfs.
    volume = tmp_path / "ro"
    volume.mkdir()
    (volume / "file").write_text("host data\n")
    attacker = env.bundle("attacker", ["sh", "-c", ATTACK], hostile_pod.pid)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(attacker.path / "upper" / "hostile_vsock"), str(PROGRAM)],
                   check=True)
    spec = json.loads((attacker.path / "config.json").read_text())
    spec["process"]["capabilities"] = {k: ALL_CAPS for k in ("bounding", "effective", "permitted")}
    spec["mounts"].append({"destination": "/ro", "type": "bind", "source": str(volume),
                           "options": ["rbind", "rprivate", "ro"]})
    (attacker.path / "config.json").write_text(json.dumps(spec))
    attacker_out = attacker.fifo("out")
    attack_out = demo.FifoReader(attacker_out)

    oom = env.bundle("oom", ["sh", "-c", "while :; do dd if=/dev/zero of=/dev/null bs=32M count=1 2>/dev/null; "
                                         "usleep 100000; done"], hostile_pod.pid)
    spec = json.loads((oom.path / "config.json").read_text())
    spec["linux"]["resources"]["memory"] = {"limit": 16 * MIB}
    (oom.path / "config.json").write_text(json.dumps(spec))

    # Writes its stdout as fast as it can (the host holds it), never reads its stdin (the host writes).
    flood = env.bundle("flood", ["sh", "-c", f"yes hostile | head -c {FLOOD_BYTES}; exec sleep 1000"],
                       hostile_pod.pid)
    flood_out, flood_in = flood.fifo("out"), flood.fifo("in")
    flooded = HeldReader(flood_out)
    stop_stdin, stdin_accepted = threading.Event(), [0]
    stdin_writer = threading.Thread(target=_fill_stdin, args=(flood_in, stop_stdin, stdin_accepted), daemon=True)

    idle = [_timed_exec(calm, service, f"idle{n}") for n in range(2)]
    started = time.monotonic()
    _start(hostile, oom)
    _start(hostile, flood, stdout=flood_out, stdin=flood_in)
    stdin_writer.start()
    _start(hostile, attacker, stdout=attacker_out)

    latencies = []
    while time.monotonic() - started < HOLD_S or not attack_out.data.endswith(b"\n") \
            or b"ro-volume" not in attack_out.data:
        latencies.append(_timed_exec(calm, service, f"e{len(latencies)}"))
        assert time.monotonic() - started < 240, f"the attack did not end: {bytes(attack_out.data)!r}"
        time.sleep(max(0.0, 1.0 - latencies[-1]))
    flooded.release()
    assert _end(hostile, attacker) == 0
    attacked = attack_out.result().decode()
    deadline = time.monotonic() + 120
    while len(flooded.data) < FLOOD_BYTES and time.monotonic() < deadline:
        time.sleep(0.1)
    stop_stdin.set()
    stdin_writer.join(10)
    _end(hostile, flood, kill=True)
    assert len(flooded.result()) == FLOOD_BYTES
    _end(hostile, oom, kill=True)
    assert _end(calm, counter) == 0
    latencies.append(_timed_exec(calm, service, "after"))
    _end(calm, service, kill=True)
    memory = watch.stop()
    duration = time.monotonic() - started
    ooms = _published(env, "/tasks/oom", events.TaskOOM, lambda e: e.container_id == "oom")
    print(f"attack {duration:.1f} s; OOM events {len(ooms)}; {attacked}; exec latencies (s): max {max(latencies):.2f} "
          f"median {sorted(latencies)[len(latencies) // 2]:.2f} of {len(latencies)} (before: {sorted(idle)}); "
          f"Pss MiB (base, peak): {memory}; stdin taken while unread: {stdin_accepted[0]} bytes")

    # The bystander lost nothing and kept answering.
    assert counted.result() == "".join(f"{i}\n" for i in range(LINES)).encode()
    assert max(latencies) < EXEC_BOUND_S, latencies

    # Each attack got an error.
    flood_line = re.search(r"flood 500 in \d+ ms: reset (\d+) refused (\d+) timedout 0 connected 0 other 0", attacked)
    assert flood_line and sum(map(int, flood_line.groups())) == 500, attacked  # each at once, none hung
    assert re.search(r"storm 10x200 in \d+ ms: pending 2000 failed 0\nafter: Connection reset by peer", attacked), \
        attacked
    results = dict(line.split(": ", 1) for line in attacked.splitlines() if line.startswith(
        ("share", "fill", "filled", "ro")))
    assert results == {"share": "mounted", "fill": "No space left on device",
                       "filled": results["filled"], "share-top": "Read-only file system",
                       "ro": "remounted", "ro-volume": "Read-only file system"}, attacked
    assert int(results["filled"].split()[0]) <= FILL_LIMIT_MIB
    assert (volume / "file").read_text() == "host data\n"
    assert stdin_accepted[0] < 8 * MIB, "the host took what the guest does not read without bound"

    # Events: the bystander's exit is published, next to the attacker's OOMs.
    assert _published(env, "/tasks/exit", events.TaskExit, lambda e: e.container_id == e.id == "count")
    assert ooms, "the OOM loop made no event"

    # The host's processes stayed small.
    assert all(peak - base <= PSS_GROWTH_MIB for base, peak in memory.values()), memory

    env.cri.remove_pod("hostile")
    env.cri.remove_pod("calm")
    shutil.rmtree(env.work / "bundles", ignore_errors=True)
