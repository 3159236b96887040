"""The confinement of the daemon's own helpers, the vsock backend and the FIFO keepers: no
capabilities and no_new_privs (they need none: the backend listens and connects in directories
root owns, the keepers hold an fd), in the daemon's helpers cgroup once the daemon made it
(`use_cgroup`, at start; one daemon per process). They stay uid 0, the owner of the state
directory's files (docs/security.md)."""
from __future__ import annotations

from host_sandboxer.containment.cgroups import Cgroup
from host_sandboxer.containment.launch import NO_CAPABILITIES, Confinement

_cgroup: Cgroup | None = None


def use_cgroup(cgroup: Cgroup | None) -> None:
    global _cgroup
    _cgroup = cgroup


def confinement() -> Confinement:
    return Confinement(_cgroup.procs_files if _cgroup else (), capabilities=NO_CAPABILITIES, no_new_privs=True)
