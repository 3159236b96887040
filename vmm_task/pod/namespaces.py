"""The pod's IPC, UTS and (when asked) PID namespaces, shared by all its containers.

The agent's thread unshares the namespaces (unshare affects only the calling thread for these
kinds), sets the pod hostname and IPC sysctls inside them, bind-mounts its namespace files to
`<dir>/ipc`, `<dir>/uts` (the bind mounts keep the namespaces alive), and goes back to its own
namespaces (setns), all in one synchronous step: no other coroutine runs meanwhile. Not a
thread of its own: in a template clone under TCG the thread's start and the GIL passing to and
from it made this step 0.146 s, 0.043 s without (docs/templates.md "Third round"). A PID
namespace needs a living init, so for it the pod's "pause" is spawned while the thread's
children go to the new namespace: PID 1 of the namespace reaping orphans there: pod-pause
(rootfs-builder/pod-pause.c), a small native program, not a fork of the agent (a fork keeps a
copy-on-write copy of the agent's whole heap: 7-11 MB of guest RAM per pod,
docs/host-memory.md). `<dir>/pid` binds its namespace. Containers join these paths through
their OCI config.
"""

import os
import signal
import socket

from vmm_task.init import syscalls as sc

KINDS = {"ipc": sc.CLONE_NEWIPC, "uts": sc.CLONE_NEWUTS}
# The agent's own namespaces, entered again once the pod's are made (pid_for_children: what a
# CLONE_NEWPID unshare changed for the thread's later children).
OWN = {**KINDS, "pid": sc.CLONE_NEWPID}


class PodNamespaces:
    def __init__(self, directory: str, pod_pause: str):
        """`pod_pause`: path of the pod-pause binary (the guest's /usr/sbin/pod-pause)."""
        self.directory = directory
        self.pod_pause = pod_pause
        self.paths: dict[str, str] = {}
        self.holder_pid: int | None = None
        self._alive_w: int | None = None  # the holder exits when this closes (agent gone)

    def create(self, hostname: str, ipc_sysctls: dict[str, str], share_pid: bool) -> None:
        """Make the namespaces; raises OSError, or ValueError for a bad sysctl, naming what
        failed (after undoing what was made)."""
        os.makedirs(self.directory, mode=0o711, exist_ok=True)
        own: dict[str, int] = {}
        try:
            for kind in OWN:
                own[kind] = os.open(f"/proc/thread-self/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._make(hostname, ipc_sysctls, share_pid)
            finally:
                _go_back(own)
        except BaseException:
            self.destroy()
            raise
        finally:
            for fd in own.values():
                os.close(fd)

    def _make(self, hostname: str, ipc_sysctls: dict[str, str], share_pid: bool) -> None:
        from vmm_task.pod.files import write_sysctl

        flags = sc.CLONE_NEWIPC | sc.CLONE_NEWUTS | (sc.CLONE_NEWPID if share_pid else 0)
        sc.unshare(flags)
        if hostname:
            socket.sethostname(hostname)
        for name, value in ipc_sysctls.items():
            write_sysctl(name, value)
        for kind in KINDS:
            self._bind(kind, f"/proc/thread-self/ns/{kind}")
        if share_pid:
            alive_r, self._alive_w = os.pipe()
            try:
                self.holder_pid = _spawn_holder(self.pod_pause, alive_r)
            finally:
                os.close(alive_r)
            self._bind("pid", f"/proc/{self.holder_pid}/ns/pid")

    def _bind(self, kind: str, source: str) -> None:
        target = os.path.join(self.directory, kind)
        with open(target, "a"):
            pass  # a bind mount needs an existing file as its target
        sc.mount(source, target, None, sc.MS_BIND)
        self.paths[kind] = target

    def destroy(self) -> None:
        """Unmount the namespace files and stop the holder (best effort: used on failure and
        at agent shutdown in dev mode)."""
        for target in self.paths.values():
            try:
                sc.umount(target, sc.MNT_DETACH)
                os.unlink(target)
            except OSError:
                pass
        self.paths.clear()
        if self.holder_pid is not None:
            try:
                os.kill(self.holder_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.holder_pid = None
        if self._alive_w is not None:
            os.close(self._alive_w)
            self._alive_w = None


def _go_back(own: dict[str, int]) -> None:
    """Enter each of the agent's own namespaces again (kind -> fd), every kind tried even when
    one fails: a kind left the pod's would put the agent's later children in it. Raises OSError
    naming the kinds that failed."""
    failed = []
    for kind, fd in own.items():
        try:
            sc.setns(fd, OWN[kind])
        except OSError as e:
            failed.append(f"{kind}: {e}")
    if failed:
        raise OSError(f"the agent could not go back to its own namespaces ({'; '.join(failed)}): "
                      "its later children would start in the pod's")


def _spawn_holder(binary: str, alive_r: int) -> int:
    """Start the PID namespace's init (call after unshare(CLONE_NEWPID), from the same thread:
    the namespace is that thread's for its children). posix_spawn forks and execs in C, so no
    Python runs in the child, which could otherwise meet a lock another thread held at the
    fork. The child gets `alive_r` as fd 3, a pipe whose write end only the agent holds: it
    exits on EOF there, when the agent died without killing it (dev mode). Not PR_SET_PDEATHSIG:
    it fires when the spawning thread ends (in dev mode, a thread of the agent's may), and it
    cannot be set without code in the child. Its stdio is /dev/null, not the agent's console or log. Raises OSError naming
    `binary` if it cannot be run."""
    stdio = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDWR, 0),
             (os.POSIX_SPAWN_DUP2, 0, 1), (os.POSIX_SPAWN_DUP2, 0, 2)]
    try:
        return os.posix_spawn(binary, [binary, "3"], {},
                              file_actions=[(os.POSIX_SPAWN_DUP2, alive_r, 3), *stdio])
    except OSError as e:
        raise OSError(e.errno, f"cannot run the pod's PID-namespace init {binary}: "
                               f"{e.strerror}") from None
