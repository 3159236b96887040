"""The Python floor's PID 1: the ready line at once, then sleep (PID 1 must not exit).

Compiled by Nuitka with the agent's own options (initrd/agent.py) and booted from a pmem root like
the agent's, it measures what any Python PID 1 built this way pays before its first line of work:
the interpreter's and Nuitka's start-up under the same kernel (bench.boot, `python_floor`).
"""
import os
import time

READY_LINE = "vmm-task ready (floor: Nuitka-compiled Python /init)"

# Reported as `ready=` on the guest clock, as the agent and the busybox floor do.
os.write(1, f"{READY_LINE} ready={time.clock_gettime(time.CLOCK_BOOTTIME):.3f}s\n".encode())
while True:
    time.sleep(3600)
