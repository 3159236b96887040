"""State shared by every service of one agent (one `AgentContext` per process)."""

from vmm_task.events import EventQueue
from vmm_task.reaper import Reaper

STATE_DIR = "/run/kuasar/state"  # the shared directory (virtiofs/9p tag "kuasar") in the VM


class SandboxState:
    """What SetupSandbox established for the pod, for the Task service to apply to containers.

    `namespaces`: {"ipc": path, "uts": path, "pid": path or None} (None: no shared pod PID
    namespace, each container gets its own). `hosts_path`/`resolv_path`: files to bind into
    containers (None until SetupSandbox wrote them). `holder_pid`: the pod PID namespace's init
    (None without one). `ready`: SetupSandbox completed.
    """

    __slots__ = ("hostname", "namespaces", "hosts_path", "resolv_path", "holder_pid", "ready")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Back to "no pod set up" (SetupSandbox failed and may be tried again)."""
        self.hostname = ""
        self.namespaces: dict[str, str | None] = {"ipc": None, "uts": None, "pid": None}
        self.hosts_path: str | None = None
        self.resolv_path: str | None = None
        self.holder_pid: int | None = None
        self.ready = False


class AgentContext:
    """Handed to every service. `debug`: booted with `task.debug` (ExecVMProcess allowed).
    `dev_mode`: an ordinary host process (`--listen unix://...`), not PID 1 in a VM.
    `run_dir`: where the agent keeps its own runtime files (pod namespaces, resolv.conf, ...).
    `runtime`: path of crun or runc. `pod_pause`: path of pod-pause, the pod PID namespace's
    init (vmm_task/pod/namespaces.py). `manage_network`: the network namespace is the pod's to
    configure (always in the VM; dev mode only with --manage-network). `boot_problems`: what
    failed while booting (PID 1). `sharefs_type`: the shared directory's filesystem (PID 1: boot
    mounts it at `state_dir`, SetupSandbox again if boot could not, as in a VM template's clone
    that gets the device later). `started_boottime`: CLOCK_BOOTTIME when main() began. `services`: names registered on the
    server. `cleanups`: callables run when the server stops (dev mode: unmount what we mounted)."""

    __slots__ = ("reaper", "events", "sandbox", "debug", "dev_mode", "state_dir", "run_dir",
                 "runtime", "pod_pause", "manage_network", "boot_problems", "sharefs_type",
                 "started_boottime", "services", "cleanups")

    def __init__(self, *, reaper: Reaper, events: EventQueue, dev_mode: bool, debug: bool = False,
                 state_dir: str = STATE_DIR, run_dir: str = "/run", runtime: str = "crun",
                 pod_pause: str = "pod-pause", manage_network: bool = False,
                 boot_problems: list[str] | None = None, sharefs_type: str | None = None,
                 started_boottime: float = 0.0):
        self.reaper = reaper
        self.events = events
        self.sandbox = SandboxState()
        self.debug = debug
        self.dev_mode = dev_mode
        self.state_dir = state_dir
        self.run_dir = run_dir
        self.runtime = runtime
        self.pod_pause = pod_pause
        self.manage_network = manage_network
        self.boot_problems = [] if boot_problems is None else boot_problems
        self.sharefs_type = sharefs_type
        self.started_boottime = started_boottime
        self.services: list[str] = []
        self.cleanups: list = []
