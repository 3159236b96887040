"""Text from an untrusted peer (the guest), cut to a length the host can log and return.

A guest may put megabytes into an error message, an event field or a console line; whatever of
it the host quotes (logs, gRPC errors, Status reasons) goes through `capped`, which keeps the
start and says how much was cut.
"""

MAX_CHARS = 1024


def capped(text: str, limit: int = MAX_CHARS) -> str:
    """`text` if it has at most `limit` characters, else its first `limit` and a marker."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [{len(text) - limit} more characters cut]"
