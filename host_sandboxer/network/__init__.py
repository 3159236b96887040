"""Pod networking on the host: the links the CNI made in the pod's network namespace are
taken over by the VM through taps and tc redirects (plumbing.attach/detach), and described to
the guest agent (messages).  See docs/networking.md."""
from host_sandboxer.network.errors import NamespaceGone, NetworkError
from host_sandboxer.network.messages import interfaces_request, routes_request

_PLUMBING = ("Attachment", "attach", "detach")


def __getattr__(name: str):
    """The plumbing (and with it pyroute2, ~10 MB) loads only when a pod has a netns."""
    if name in _PLUMBING:
        from host_sandboxer.network import plumbing
        return getattr(plumbing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["Attachment", "NamespaceGone", "NetworkError", "attach", "detach",
           "interfaces_request", "routes_request"]
