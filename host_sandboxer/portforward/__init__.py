"""CRI port-forwarding into VM pods (docs/networking.md, "Port-forward"): containerd dials
`localhost:PORT` inside the pod's network namespace; a NAT rule there hands the connection to
the daemon's listener (redirect.py), which relays it to the guest agent, which connects to
127.0.0.1:PORT in the VM (forwarder.py, vmm_task/portforward.py)."""
from host_sandboxer.portforward.forwarder import PortForwarder, remove_redirect

__all__ = ["PortForwarder", "remove_redirect"]
