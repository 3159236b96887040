"""The pods' mount namespace: where the daemon makes every pod's mounts (docs/security.md, "Mounts").

A bind of a volume into a pod's directory made in the host's mount namespace pins the volume
there: the host cannot remove a directory that is a mount point of it (EBUSY; critest's
read-only mount specs, whose cleanup removes the hostPath while the container runs). Since
Linux 3.18 a mount point in another mount namespace no longer blocks rmdir/unlink on the host
(the mount there is detached). So the pods' mounts live in one mount namespace per state
directory, a slave of the host's (mounts the host makes later under a volume still arrive), and
the host's mount table shows none of them: only the pin, `<dir>/.mntns` (a private bind of
itself, as a namespace file must be bound on a mount that does not propagate) and
`<dir>/.mntns/ns`. The pin keeps the namespace and lets a restarted daemon find it again.

The daemon is multithreaded and so cannot enter a mount namespace (setns(CLONE_NEWNS) is
refused): a short-lived worker does (worker.py). The daemon makes each mount detached, as the
host sees its source (open_tree's clone, fsmount), and hands the fds to the worker, which
attaches them in the namespace (ops.py); virtiofsd, and QEMU serving 9p, are started in it
(containment/launch.py, through nsenter).
"""
