"""The few Linux system calls Python 3.11's os module lacks: mount, umount2, unshare, setns, reboot.

mount and umount2 (and their MS_* flags) come from vmm_common.mount, shared with the host;
unshare, setns and reboot are the agent's own, through the same libc caller (OSError naming the call).
"""

import ctypes

from vmm_common.mount import (  # noqa: F401  (re-exported: the agent mounts through here)
    MNT_DETACH, MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_RDONLY, MS_REC,
    MS_REMOUNT, MS_SHARED, MS_SLAVE, call_libc, mount, umount,
)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

RB_POWER_OFF = 0x4321FEDC


def unshare(flags: int) -> None:
    call_libc("unshare", f"{flags:#x}", ctypes.c_int(flags))


def setns(fd: int, nstype: int) -> None:
    call_libc("setns", f"fd {fd} {nstype:#x}", ctypes.c_int(fd), ctypes.c_int(nstype))


def reboot(command: int) -> None:
    call_libc("reboot", f"{command:#x}", ctypes.c_int(command))
