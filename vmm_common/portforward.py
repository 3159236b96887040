"""The port-forward stream (CRI PortForward into a VM pod, docs/networking.md): what the daemon
and the agent say to each other on vsock port VSOCK_PORT.

The host connects and sends one line `PORT <n>\\n`; the agent connects to 127.0.0.1:<n> (then
[::1]:<n>) inside the guest and answers `OK\\n`, or `ERR <reason>\\n` and closes; after `OK` the
connection carries the TCP stream's bytes both ways, each end's EOF passed on as a half-close.
Stdlib-free on purpose: PID 1 imports this for the port number at start-up.
"""

VSOCK_PORT = 1026  # beside Kuasar's 1024 (ttrpc) and 1025 (debug console); stdio uses 2048 and up
MAX_LINE = 128     # a longer request or answer is a protocol error
OK = b"OK\n"
_REQUEST = b"PORT "


class ProtocolError(ValueError):
    """A line that is not what the protocol allows: that connection is closed, nothing else."""


def request(port: int) -> bytes:
    return _REQUEST + b"%d\n" % port


def parse_request(line: bytes) -> int:
    """The TCP port a `PORT <n>\\n` line names (ProtocolError for anything else)."""
    number = line[len(_REQUEST):-1]
    if not line.startswith(_REQUEST) or not line.endswith(b"\n") or not number.isdigit() \
            or len(number) > 5 or not 0 < int(number) < 65536:
        raise ProtocolError(f"bad port-forward request {line[:MAX_LINE]!r}")
    return int(number)


def refusal(reason: str) -> bytes:
    """An `ERR` answer; the reason is cut to fit the line."""
    text = " ".join(reason.split()).encode("utf-8", "replace")
    return b"ERR " + text[:MAX_LINE - len(b"ERR \n")] + b"\n"


def check_answer(line: bytes) -> None:
    """Nothing for `OK`; ConnectionRefusedError with the agent's reason for `ERR`; ProtocolError
    for anything else (no line at all: the agent closed without answering)."""
    if line == OK:
        return
    if line.startswith(b"ERR ") and line.endswith(b"\n") and len(line) <= MAX_LINE:
        raise ConnectionRefusedError(line[4:-1].decode("utf-8", "replace"))
    raise ProtocolError(f"bad port-forward answer {line[:MAX_LINE]!r}")
