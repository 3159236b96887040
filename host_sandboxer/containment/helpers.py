"""The confinement of the daemon's own helpers, the vsock backend, the task relay and the FIFO
keepers: no capabilities and no_new_privs (they need none), in the daemon's helpers cgroup once
the daemon made it (`use_cgroup`, at start; one daemon per process). The vsock backend also gets
a uid of its own (`user`; the daemon hands it its sockets); the others stay uid 0, the owner of
the state directory's files they open by path (docs/security.md)."""
from __future__ import annotations

from host_sandboxer.containment.cgroups import Cgroup
from host_sandboxer.containment.launch import NO_CAPABILITIES, Confinement

_cgroup: Cgroup | None = None


def use_cgroup(cgroup: Cgroup | None) -> None:
    global _cgroup
    _cgroup = cgroup


def confinement(user: int | None = None) -> Confinement:
    """`user`: run as that uid and gid (None: stay root)."""
    return Confinement(_cgroup.procs_files if _cgroup else (), user=user, capabilities=NO_CAPABILITIES,
                       no_new_privs=True)
