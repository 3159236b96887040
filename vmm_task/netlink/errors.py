"""Errors of the network configuration, mapped to ttrpc status codes by the service."""


class NetworkConfigError(Exception):
    """`not_found`: the request named a link that does not exist (NOT_FOUND rather than
    INVALID_ARGUMENT)."""

    def __init__(self, message: str, not_found: bool = False):
        super().__init__(message)
        self.not_found = not_found
