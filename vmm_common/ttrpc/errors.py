"""Status codes and the two error types of ttrpc.

RpcError is a call's failure (a google.rpc.Status on the wire); ProtocolError is a
broken connection (bad framing or envelope) and always ends that connection.
"""
import enum


class Code(enum.IntEnum):
    """google.rpc.Code, the status codes ttrpc carries (same numbers as gRPC)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class RpcError(Exception):
    """A call failed with `code`; raised by handlers and by Client calls."""

    def __init__(self, code: int, message: str = ""):
        try:
            code = Code(code)
        except ValueError:
            message = f"(unknown status code {code}) {message}"
            code = Code.UNKNOWN
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class ProtocolError(Exception):
    """The peer broke the framing or sent an undecodable envelope: drop the connection."""
