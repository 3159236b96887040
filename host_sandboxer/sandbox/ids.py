"""ID validation: sandbox, container and exec IDs become directory names on the host."""

import re

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class InvalidID(ValueError):
    """An ID that is empty, too long, or could escape a directory."""


def check_id(kind: str, value: str) -> str:
    """Return `value` if it is a safe ID, else raise InvalidID naming `kind` and the value."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise InvalidID(f"invalid {kind} id {value!r}: must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}")
    return value
