"""A container's stdio across `kill -9` of vmm-sandboxer: not a byte of output lost, stdin open.

Real daemon, real QEMU (TCG) with the real agent and crun, hybrid vsock; the test reads and
writes the FIFOs as containerd does (the output FIFO read to EOF). The container writes a counter
big enough that, with the reader paused, the whole path is full when the daemon dies (FIFO,
daemon buffers, the agent's unacknowledged window, the container's pipe): the container is
blocked on back-pressure, bytes are in flight at every stage. Then kills at random points of a
flowing stream (VMM_TASK_KILL_SEED repeats a draw; the seed is printed).
"""

import os
import random
import signal
import threading
import time

from test_sandboxer import NS, demo, env  # noqa: F401  (env: the fixture)
from test_sandboxer_restart import _crash_daemon, _gone, _processes_naming

from host_sandboxer.taskproxy.stdio import CHUNK
from vmm_common.protos.containerd.services.sandbox.v1 import sandbox_pb2 as sb
from vmm_common.protos.containerd.task.v3 import shim_pb2 as task

LINES = 1_000_000  # `seq` writes ~6.9 MB: more than the agent's window and every buffer together
SCRIPT = f"read a; echo got:$a; seq 1 {LINES}; read b; echo got:$b"
EXPECTED = b"got:one\n" + "".join(f"{i}\n" for i in range(1, LINES + 1)).encode() + b"got:two\n"


class PausingReader:
    """Reads a FIFO to EOF in a thread, as containerd does, but stops after `pause_after` bytes
    until `resume()`."""

    def __init__(self, path: str, pause_after: int):
        self.data = bytearray()
        self.paused = threading.Event()
        self._resume = threading.Event()
        self._pause_after = pause_after
        self._thread = threading.Thread(target=self._run, args=(path,), daemon=True)
        self._thread.start()

    def _run(self, path: str):
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(65536):
                self.data += chunk
                if len(self.data) >= self._pause_after and not self._resume.is_set():
                    self.paused.set()
                    self._resume.wait()

    def resume(self):
        self._resume.set()

    def reading(self) -> bool:
        """Still reading: no EOF yet."""
        return self._thread.is_alive()

    def result(self, timeout: float) -> bytes:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"no EOF after {len(self.data)} bytes"
        return bytes(self.data)


def _common_prefix(a: bytes, i: int, b: bytes, j: int, step: int = 1 << 16) -> int:
    """How many bytes of a[i:] and b[j:] agree from the start."""
    n = 0
    while True:
        x, y = a[i + n:i + n + step], b[j + n:j + n + step]
        if x == y and len(x) == step:
            n += step
            continue
        return n + next((k for k in range(min(len(x), len(y))) if x[k] != y[k]), min(len(x), len(y)))


def _repeats(got: bytes, want: bytes, longest: int) -> list[int]:
    """`got` is `want` with nothing lost or reordered, but where a resend after a kill started
    again up to `longest` bytes back (the bytes of one FIFO write the dead daemon had not
    recorded): the lengths of those repeats. AssertionError naming the first loss otherwise."""
    i = j = 0
    repeats = []
    while True:
        n = _common_prefix(got, i, want, j)
        i, j = i + n, j + n
        if i == len(got):
            assert j == len(want), f"the output ends at byte {j} of {len(want)}: {want[j:j + 40]!r}... lost"
            return repeats
        probe = got[i:i + 4096]  # a resend: these bytes were in `want` a little before j
        again = want.find(probe, max(0, j - longest), j + len(probe) - 1)
        assert 0 <= again < j, f"output byte {i} is neither byte {j} of the stream nor a resend: " \
                               f"{got[i:i + 40]!r} where {want[j:j + 40]!r} was due"
        repeats.append(j - again)
        j = again


def _first_difference(got: bytes, want: bytes) -> str:
    at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return f"{len(got)} bytes, {len(want)} expected; first difference at {at}: " \
           f"{got[at - 20:at + 20]!r} vs {want[at - 20:at + 20]!r}"


def test_output_and_stdin_survive_a_daemon_kill(env):
    started = env.cri.run_pod("resume")
    tasks = demo.Cri.task_client(started.address)
    b = env.bundle("resume-c", ["sh", "-c", SCRIPT], started.pid)
    stdin, stdout = b.fifo("stdin"), b.fifo("stdout")
    reader = PausingReader(stdout, pause_after=256 << 10)
    tasks.Create(task.CreateTaskRequest(id=b.id, bundle=str(b.path), rootfs=b.rootfs, stdin=stdin,
                                        stdout=stdout), metadata=NS, timeout=60)
    writer = os.open(stdin, os.O_WRONLY)  # the daemon's relay opens the reading end
    tasks.Start(task.StartRequest(id=b.id), metadata=NS, timeout=60)
    os.write(writer, b"one\n")
    assert reader.paused.wait(60), f"only {len(reader.data)} bytes arrived"
    time.sleep(3)  # the path fills up; the container blocks
    pid = tasks.State(task.StateRequest(id=b.id), metadata=NS, timeout=10).pid
    _crash_daemon(env)
    received_before = len(reader.data)
    assert received_before < len(EXPECTED) // 2, "the stream spans the restart"

    env.daemon.start()
    tasks = demo.Cri.task_client(started.address)
    state = tasks.State(task.StateRequest(id=b.id), metadata=NS, timeout=10)
    assert (state.pid, state.stdin, state.stdout) == (pid, stdin, stdout)
    reader.resume()
    os.write(writer, b"two\n")  # stdin was not closed by the daemon's death
    os.close(writer)
    assert tasks.Wait(task.WaitRequest(id=b.id), metadata=NS, timeout=180).exit_status == 0
    got = reader.result(60)
    assert got == EXPECTED, _first_difference(got, EXPECTED)  # no gap, no duplicate
    tasks.Delete(task.DeleteRequest(id=b.id), metadata=NS, timeout=60)
    stdio_dir = env.daemon.state / "resume" / "stdio"
    assert list(stdio_dir.glob("[0-9]*")) == [], "the process's marks go with it"
    assert _processes_naming(stdio_dir) == [], "and so do the keepers of its FIFOs"
    env.cri.remove_pod("resume")
    assert not (env.daemon.state / "resume").exists()


def test_streams_of_a_vm_lost_while_the_daemon_was_down_reach_eof(env):
    """containerd waits for EOF on the output FIFOs before it deletes a process: the keepers of
    a pod whose VM died meanwhile are stopped by the next daemon."""
    started = env.cri.run_pod("gone")
    tasks = demo.Cri.task_client(started.address)
    b = env.bundle("gone-c", ["sh", "-c", "echo before; exec sleep 1000"], started.pid)
    stdout = b.fifo("stdout")
    reader = PausingReader(stdout, pause_after=1 << 40)
    tasks.Create(task.CreateTaskRequest(id=b.id, bundle=str(b.path), rootfs=b.rootfs, stdout=stdout),
                 metadata=NS, timeout=60)
    tasks.Start(task.StartRequest(id=b.id), metadata=NS, timeout=60)
    deadline = time.monotonic() + 60
    while reader.data != b"before\n" and time.monotonic() < deadline:
        time.sleep(0.1)
    _crash_daemon(env)
    os.kill(started.pid, signal.SIGKILL)
    assert _gone([started.pid])
    assert reader.reading(), "the keeper holds the FIFO while no daemon does"

    env.daemon.start()
    assert reader.result(20) == b"before\n"
    tasks = demo.Cri.task_client(started.address)
    assert tasks.Delete(task.DeleteRequest(id=b.id), metadata=NS, timeout=10).exit_status == 255
    env.cri.controller.Shutdown(sb.ControllerShutdownRequest(sandbox_id="gone"), metadata=NS, timeout=60)
    assert _processes_naming(env.daemon.state) == []


KILLS = 3
LONG_LINES = 2_000_000  # ~14.9 MB
LONG_EXPECTED = "".join(f"{i}\n" for i in range(1, LONG_LINES + 1)).encode()


def test_output_survives_daemon_kills_at_random_points(env):
    """kill -9 of the daemon at KILLS output offsets drawn at random, each restarted at once;
    the reader reads all along. Nothing lost or reordered; at most one FIFO write repeated per
    kill (README, Limits)."""
    seed = int(os.environ.get("VMM_TASK_KILL_SEED") or random.randrange(1 << 32))
    points = sorted(random.Random(seed).sample(range(len(LONG_EXPECTED)), KILLS))
    print(f"\nkill -9 points (output offsets) {points}: VMM_TASK_KILL_SEED={seed}")
    started = env.cri.run_pod("kills")
    tasks = demo.Cri.task_client(started.address)
    b = env.bundle("kills-c", ["seq", "1", str(LONG_LINES)], started.pid)
    stdout = b.fifo("stdout")
    reader = PausingReader(stdout, pause_after=1 << 40)
    tasks.Create(task.CreateTaskRequest(id=b.id, bundle=str(b.path), rootfs=b.rootfs, stdout=stdout),
                 metadata=NS, timeout=60)
    tasks.Start(task.StartRequest(id=b.id), metadata=NS, timeout=60)
    for point in points:
        deadline = time.monotonic() + 120
        while len(reader.data) < point and reader.reading():
            assert time.monotonic() < deadline, f"seed {seed}: {len(reader.data)} bytes, waiting for {point}"
            time.sleep(0.002)
        _crash_daemon(env)
        env.daemon.start()
    tasks = demo.Cri.task_client(started.address)
    assert tasks.Wait(task.WaitRequest(id=b.id), metadata=NS, timeout=180).exit_status == 0
    got = reader.result(120)
    repeats = _repeats(got, LONG_EXPECTED, CHUNK)
    print(f"{len(got)} bytes received, repeats {repeats}")
    assert len(repeats) <= KILLS, f"seed {seed}: repeats {repeats}"
    tasks.Delete(task.DeleteRequest(id=b.id), metadata=NS, timeout=60)
    env.cri.remove_pod("kills")
