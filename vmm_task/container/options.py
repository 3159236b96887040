"""The runc shim's `Options` a Create may carry (containerd.runc.v1.Options, from the runtime's
`options` in containerd's config), as far as they mean something inside the guest.

Applied: `no_pivot_root` and `no_new_keyring` (runtime flags), `io_uid`/`io_gid` (owner of the
stdio pipes; containerd sets them for a pod in a user namespace). Not applied, because the guest
decides them: `binary_name` and `root` (the guest has one runtime, `task.runtime`, with a private
state root), `systemd_cgroup` (no systemd in the guest), `shim_cgroup`, the CRIU paths
(no checkpoints) and the task API address. An Any of another type is tolerated and ignored, as
the runc shim does with options it does not know.
"""

from typing import NamedTuple, Optional

from .errors import invalid_argument

OPTIONS_TYPE = "containerd.runc.v1.Options"


class CreateOptions(NamedTuple):
    no_pivot_root: bool = False
    no_new_keyring: bool = False
    io_owner: Optional[tuple[int, int]] = None  # None: the process's own user (our default)


def create_options(packed, what: str) -> CreateOptions:
    """The options of a Create request's `options` Any (None or empty: the defaults)."""
    if packed is None or not packed.type_url or packed.type_url.rsplit("/", 1)[-1] != OPTIONS_TYPE:
        return CreateOptions()
    from google.protobuf.message import DecodeError

    from vmm_common.protos.containerd.runc.v1 import oci_pb2

    options = oci_pb2.Options()
    try:
        options.ParseFromString(packed.value)
    except DecodeError as e:
        raise invalid_argument(f"{what}: options are not {OPTIONS_TYPE}: {e}") from None
    owner = (options.io_uid, options.io_gid) if options.io_uid or options.io_gid else None
    return CreateOptions(options.no_pivot_root, options.no_new_keyring, owner)
