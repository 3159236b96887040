"""containerd.task.v3.Task served per pod on the host, forwarded to the guest's task v2."""
