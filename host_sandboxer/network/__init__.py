"""Pod networking on the host: the links the CNI made in the pod's network namespace are
taken over by the VM through taps and tc redirects (plumbing.attach/detach), and described to
the guest agent (messages).  See docs/networking.md."""
from host_sandboxer.network.errors import NamespaceGone, NetworkError
from host_sandboxer.network.messages import interfaces_request, routes_request
from host_sandboxer.network.plumbing import Attachment, attach, detach

__all__ = ["Attachment", "NamespaceGone", "NetworkError", "attach", "detach",
           "interfaces_request", "routes_request"]
