"""Container and exec IDs become directory and file names (runtime state, console sockets, pid
files), so anything that could name another directory is refused before it is used."""

import re

from .errors import invalid_argument

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_id(kind: str, value: str) -> str:
    """Return `value` when it is a valid `kind` ID ("container" or "exec"), else INVALID_ARGUMENT."""
    if not _ID.fullmatch(value):
        raise invalid_argument(
            f"invalid {kind} id {value[:140]!r}: must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}")
    return value
