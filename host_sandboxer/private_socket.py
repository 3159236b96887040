"""Unix sockets the host's processes listen on, root-only from the moment they exist.

A socket file's mode comes from the umask at bind(): a chmod after it would leave a moment in
which others may connect. Used by the daemon's helpers (vsock backend, task relay) and for the
pods' task addresses; imports nothing but the stdlib (the helpers run lean).
"""
import os
import socket


def listen_unix(path: str, backlog: int) -> socket.socket:
    """A unix stream socket listening at `path` (replacing a stale file there), mode 0600."""
    if os.path.lexists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    sock.listen(backlog)
    return sock
