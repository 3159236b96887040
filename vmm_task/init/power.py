"""Clean power-off for configuration errors PID 1 cannot recover from (exiting would panic)."""

import logging
import os
import time

from vmm_task.init import syscalls

log = logging.getLogger(__name__)


def power_off(reason: str) -> None:
    """Log `reason`, flush file systems and power the VM off; never returns."""
    log.critical("fatal: %s; powering off", reason)
    os.sync()
    try:
        syscalls.reboot(syscalls.RB_POWER_OFF)
    except OSError as e:
        log.critical("power-off failed (%s); halting here", e)
    while True:  # PID 1 must never return
        time.sleep(3600)
