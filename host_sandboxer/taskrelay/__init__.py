"""The task relay: the process that holds containerd's task connections across daemon restarts.

serve.py (the process: relay.py, conn.py, control.py, outbox.py, reexec.py, on the vsock
backend's reactor), wire.py (the frames both sides read), link.py (the daemon's side).
Importing this package loads nothing: the relay process stays lean.
"""
