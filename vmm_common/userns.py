"""The pod's user namespace options (CRI's NamespaceOption.userns_options), refused where a runc
pod under containerd 2.4 is refused, with the same messages: by the daemon at Controller.Create,
before a VM exists, and by the agent at SetupSandbox (for any host: Kuasar's sends the config too).

For a runc pod containerd's podsandbox controller checks the options
(internal/cri/server/podsandbox/helpers_linux.go, parseUsernsIDs: one mapping line, a length,
mode POD with mappings or NODE without, nothing else) and runc refuses a user namespace in which
the container's root has no mapping (libcontainer/configs/config_linux.go, HostUID). Both happen
while the pod is made. crun accepts such a spec and fails only when a container starts
("setresuid to 0: Invalid argument"), so both rules are applied here: RunPodSandbox fails as it
does on runc.
"""

from collections import namedtuple

MODES = {0: "POD", 1: "CONTAINER", 2: "NODE", 3: "TARGET"}  # runtime.v1.NamespaceMode

IDMapping = namedtuple("IDMapping", "container_id host_id length")


class UserNamespace:
    """`mode`: a runtime.v1.NamespaceMode number; `uids`/`gids`: lists of IDMapping."""

    __slots__ = ("mode", "uids", "gids")

    def __init__(self, mode: int, uids=(), gids=()):
        self.mode = mode
        self.uids = list(uids)
        self.gids = list(gids)


def check(userns: UserNamespace | None) -> None:
    """Raise ValueError with the message containerd or runc refuses `userns` with."""
    if userns is None:  # no options: the node's user namespace, as containerd reads it
        return
    for what, mappings in (("UID", userns.uids), ("GID", userns.gids)):
        if len(mappings) > 1:
            raise _refused(f"{what} mapping: only one mapping line supported, "
                           f"got {len(mappings)} mapping lines")
        if mappings and mappings[0].length < 1:
            raise _refused(f"{what} mapping: invalid mapping length: {mappings[0].length}")
    mode = MODES.get(userns.mode, str(userns.mode))
    if mode == "NODE":
        if userns.uids or userns.gids:
            raise _refused(f'can\'t use user namespace mode "{mode}" with mappings. Got '
                           f"{len(userns.uids)} UID mappings and {len(userns.gids)} GID mappings")
    elif mode == "POD":
        if not userns.uids or not userns.gids:
            raise _refused(f'can\'t use user namespace mode "{mode}" without UID and GID mappings')
        for kind, mappings in (("uid", userns.uids), ("gid", userns.gids)):
            if not any(m.container_id <= 0 < m.container_id + m.length for m in mappings):
                raise ValueError(f"user namespaces enabled, but no mapping found for {kind} 0")
    else:
        raise _refused(f'unsupported user namespace mode: "{mode}"')


def _refused(why: str) -> ValueError:
    return ValueError(f"user namespace configuration: {why}")
