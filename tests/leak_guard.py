"""What one pytest run leaves behind: its processes, mounts, network namespaces and temp files.

Engineers run the suite side by side on one machine, so "ours" is never guessed from a name.
The run puts a token in its environment (RUN_VARIABLE) that every process it starts inherits
(agent, daemon, QEMU, virtiofsd, the vsock backend, crun, a pod's pause process); containers
run with their spec's environment instead, so a container is ours when its cgroup
(`/vmm-task-test/<cid>`, tests/agent) names a bundle in the run's basetemp, or when it lies under
the cgroup parent an e2e node gives its pods (`/e2e-<token>-...`, tests/e2e). Mounts are ours at
or below the run's directories (pytest's basetemp and the run's own temp dir, where every
tempfile.mkdtemp of the run lands); network namespaces when their name carries the token
(bench/netpair.py puts it there); files when left in the run's temp dir.

The run's guard looks after each module, when the tests' own fixtures have torn down: what a
fixture took away silently would never reach it. So the fixtures that stop what a test started
(a daemon and its pods' VMs, a VM, an agent and its containers) take what is still there with
`take_left_in()` after the product's own stop, and fail that test naming it (`fail_if_left`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from host_sandboxer.mountns.space import Pinned
from host_sandboxer.taskproxy.mounts import mountpoints_under, unmount_all_under
from host_sandboxer.vmm.template import TemplateStore

RUN_VARIABLE = "VMM_TASK_TEST_RUN"
CONTAINER_CGROUP = "/vmm-task-test/"  # tests/agent/conftest.py oci_spec's cgroupsPath
E2E_CGROUP_PARENT = ":/e2e-{token}-"  # tests/e2e/node.py: the pods' cgroup_parent (runc's containers)
NETNS_DIR = Path("/run/netns")
# virtiofsd's sandboxed child ends on its parent's death signal, a container after its init:
# what is still there after this is left behind, not on its way out (a test of the guard
# itself sets it short).
GRACE_S = float(os.environ.get("LEAK_GUARD_GRACE_S", 15.0))


def mounts_left(directory: Path, with_pins: bool = False) -> list[str]:
    """Mount points at or below `directory`: the host's, and those in the pods' mount namespace
    of each daemon state dir there (host_sandboxer/mountns). A running daemon's pin
    (`<dir>/.mntns`, `<dir>/.mntns/ns`) is left out unless `with_pins` (a daemon that stopped
    with no pod left has removed it)."""
    found = mountpoints_under(directory)
    for pin in [p for p in found if p.endswith("/.mntns/ns")]:
        state_dir = Path(pin).parent.parent
        inside = [p for p in Pinned(state_dir).run("mountpoints", str(directory))
                  if not p.startswith(f"{state_dir}/.mntns")]
        if not with_pins:
            found = [p for p in found if not p.startswith(f"{state_dir}/.mntns")]
        found += [f"{p} (in the pods' mount namespace)" for p in inside]
    return found


def mark_run() -> str:
    """Give this process (and so every process it starts) the run's token."""
    os.environ[RUN_VARIABLE] = uuid.uuid4().hex[:8]
    return os.environ[RUN_VARIABLE]


@dataclass
class Leftovers:
    processes: dict[int, str] = field(default_factory=dict)  # pid -> command line
    mounts: list[str] = field(default_factory=list)  # deepest first
    netns: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)  # in words: a process that ignored SIGTERM, ...

    def __bool__(self) -> bool:
        return bool(self.processes or self.mounts or self.netns or self.files or self.other)

    def report(self) -> str:
        lines = [f"  {what}" for what in self.other]
        lines += [f"  process {pid}: {cmdline}" for pid, cmdline in sorted(self.processes.items())]
        lines += [f"  mount {point}" for point in self.mounts]
        lines += [f"  network namespace {name}" for name in self.netns]
        lines += [f"  file {path}" for path in self.files]
        return "\n".join(lines)


class RunGuard:
    """Finds what this run left (`leftovers()`) and takes it away (`clear()`)."""

    def __init__(self, token: str, basetemp: Path, tmp_dir: Path):
        self.token = token
        self.basetemp = basetemp
        self.tmp_dir = tmp_dir

    def leftovers(self, grace_s: float = GRACE_S) -> Leftovers:
        """What is left, given `grace_s` to go away if anything is."""
        deadline = time.monotonic() + grace_s
        while (found := self._scan()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return found

    def clear(self, found: Leftovers) -> None:
        """SIGKILL the processes, detach the mounts, delete the namespaces and files, so that
        one test's leak is reported once and does not pile onto the next."""
        for pid in found.processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for root in (self.basetemp, self.tmp_dir):
            unmount_all_under(root)
        for name in found.netns:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        for path in map(Path, found.files):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def _scan(self) -> Leftovers:
        return Leftovers(
            processes=self._processes(),
            mounts=mounts_left(self.basetemp, with_pins=True) + mounts_left(self.tmp_dir, with_pins=True),
            netns=sorted(name for name in _listdir(NETNS_DIR) if f"-{self.token}-" in name),
            files=sorted(str(self.tmp_dir / name) for name in _listdir(self.tmp_dir)))

    def _processes(self) -> dict[int, str]:
        marker = f"{RUN_VARIABLE}={self.token}".encode()
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                cgroups = Path(f"/proc/{entry}/cgroup").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:  # gone meanwhile
                continue
            if marker in environ or self._our_container(cgroups):
                found[int(entry)] = cmdline.replace(b"\0", b" ").decode(errors="replace")[:300]
        return found

    def _our_container(self, cgroups: str) -> bool:
        if E2E_CGROUP_PARENT.format(token=self.token) in cgroups:
            return True
        for line in cgroups.splitlines():
            _, _, path = line.partition(CONTAINER_CGROUP)
            if path:
                return any(self.basetemp.glob(f"*/bundles/{path.split('/')[0]}"))
        return False


def take_left_in(directory: Path, cgroup: str | None = None, grace_s: float = GRACE_S) -> Leftovers:
    """Processes whose command line names a path in `directory` (a pod's QEMU, virtiofsd, vsock
    backend or FIFO keeper: their sockets live there) or that run in `cgroup` (a container),
    and mounts under `directory`, once they had `grace_s` to go: SIGKILLed, detached and
    returned. Call it after the product's own stop."""
    deadline = time.monotonic() + grace_s
    while True:
        found = Leftovers(processes=_processes_of(directory, cgroup), mounts=mounts_left(directory, with_pins=True))
        if not found or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    for pid in found.processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    unmount_all_under(directory)
    return found


def stop_daemon(daemon, work: Path) -> Leftovers:
    """SIGTERM the vmm-sandboxer (scripts/demo.py's Daemon) of a test, then take what is left of
    it (processes naming its `work` dir or in its cgroups, mounts, pod cgroups): pods outlive the
    daemon by design, so whatever a test did not remove through the Controller (or the product
    did not stop) is found here."""
    pid = daemon.proc.pid if daemon.proc else None
    ignored = daemon.stop()
    found = take_left_in(work, cgroup=f"/{daemon.cgroup_parent}")  # QEMU's sockets are fds now
    found.other += [f"pod cgroup {daemon.cgroup_parent}/{name}"  # once, not once per v1 hierarchy
                    for name in sorted({Path(path).name for path in daemon.cgroups_left()})]
    daemon.remove_cgroups()  # and whatever still ran there
    # [vm] template: the templates' RAM outlives the daemon by design (vmm/template.py).
    shutil.rmtree(TemplateStore(daemon.state).ram_dir, ignore_errors=True)
    if ignored:
        found.other.append(f"vmm-sandboxer {pid} ignored SIGTERM for 10 s (SIGKILLed)")
    return found


def fail_if_left(found: Leftovers, what: str = "the test") -> None:
    """Fail (in a fixture's teardown: the test whose fixture it is) naming what was left."""
    if found:
        pytest.fail(f"{what} left behind (now removed):\n{found.report()}", pytrace=False)


def _processes_of(directory: Path, cgroup: str | None) -> dict[int, str]:
    marker = os.fsencode(directory) + b"/"
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            cgroups = Path(f"/proc/{entry}/cgroup").read_text() if cgroup else ""
            dead = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] == b"Z"
        except OSError:  # gone meanwhile
            continue
        if dead:  # ended; reaping it is its parent's business (PID 1 for an adopted helper)
            continue
        in_cgroup = cgroup and any(line.endswith(cgroup) or f"{cgroup}/" in line
                                   for line in cgroups.splitlines())
        if marker in cmdline or in_cgroup:
            found[int(entry)] = cmdline.replace(b"\0", b" ").decode(errors="replace")[:300]
    return found


def _listdir(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []
