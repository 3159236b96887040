"""PID-1 duties of the agent in the guest: mounts, console, kernel command line, loopback,
signals, power-off. Nothing here runs in dev mode."""
