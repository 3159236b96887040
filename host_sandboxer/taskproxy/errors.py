"""Guest failures as gRPC statuses for containerd.

A ttrpc status from the agent keeps its code (both use google.rpc codes) and message; a lost
connection to the guest (VM died, link broken) is UNAVAILABLE naming the pod. Host-side
problems with a request (bad spec, missing bundle, bad ID) are INVALID_ARGUMENT/NOT_FOUND.
"""

import grpc

_BY_NUMBER = {status.value[0]: status for status in grpc.StatusCode}


def grpc_code(number: int) -> grpc.StatusCode:
    return _BY_NUMBER.get(int(number), grpc.StatusCode.UNKNOWN)


class HostError(Exception):
    """A failure found on the host, with the gRPC code containerd should see."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
