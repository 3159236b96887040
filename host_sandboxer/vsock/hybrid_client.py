"""The host end of hybrid vsock's handshake (`CONNECT <port>\\n`, answered `OK <n>\\n`), for the
transports that reach a guest through a hybrid backend: in-process (hybrid.py) or the daemon's
backend process (vmm/vsock_backend.py)."""

import socket

from vmm_common.fdio import read_line

MAX_ANSWER = 32  # "OK 4294967295\n"


async def take_answer(sock: socket.socket, port: int) -> socket.socket:
    """`sock` once the backend said OK, with nothing of the guest's stream read from it;
    closed and ConnectionRefusedError if the guest refused (or is not up)."""
    try:
        line = await read_line(sock, MAX_ANSWER)
    except BaseException:  # cancelled (a caller's timeout) or reset
        sock.close()
        raise
    if not line.startswith(b"OK ") or not line.endswith(b"\n"):
        sock.close()
        raise ConnectionRefusedError(f"vsock port {port}: refused (nothing listening, or the "
                                     "guest is not up)")
    return sock
