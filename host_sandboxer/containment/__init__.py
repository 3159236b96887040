"""What confines the processes the daemon runs for pods: their cgroups (cgroups.py), their
user, capabilities and no_new_privs, set between fork and exec by a small wrapper (launch.py),
the uid each pod's QEMU gets (uids.py), and the bounded tmpfs the guest writes in
(pod_tmpfs.py). What is and is not contained, and why: docs/security.md."""
