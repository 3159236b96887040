"""Failures found on the host, with the status code containerd should see.

A HostError carries a grpc.StatusCode (the Controller answers over gRPC); the Task API, served
over ttrpc, answers the same code by number (both use google.rpc codes). A ttrpc status from the
agent keeps its code and message; a lost connection to the guest (VM died, link broken) is
UNAVAILABLE naming the pod. Host-side problems with a request (bad spec, missing bundle, bad ID)
are INVALID_ARGUMENT/NOT_FOUND.
"""

import grpc


class HostError(Exception):
    """A failure found on the host, with the gRPC code containerd should see."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
