"""What confines what the daemon runs and keeps for pods: the bounded tmpfs the guest writes in
(pod_tmpfs.py). What is and is not contained, and why: docs/security.md."""
