"""Pod (sandbox) state of the daemon: IDs, the state directory, the pod lifecycle, recovery."""
