"""Errors of pod networking: each message names the namespace or link and the problem."""


class NetworkError(RuntimeError):
    pass


class NamespaceGone(NetworkError):
    """The path names no network namespace (never created, or already deleted by the CNI)."""
