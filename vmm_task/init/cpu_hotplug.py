"""Online the vCPUs the host hot-adds (what udev does on a distribution).

The daemon grows a running pod (Controller.Update) with QMP `device_add` of a CPU; the kernel
registers /sys/devices/system/cpu/cpuN offline and announces it with a uevent
("add@/devices/system/cpu/cpuN") on NETLINK_KOBJECT_UEVENT. Without someone writing 1 to its
`online` the vCPU would sit unused. Memory needs nothing: the kernel onlines hot-added memory
itself (CONFIG_MEMORY_HOTPLUG_DEFAULT_ONLINE).
"""

import logging
import os
import re
import socket

log = logging.getLogger(__name__)

NETLINK_KOBJECT_UEVENT = 15
KERNEL_EVENTS_GROUP = 1
CPU_DIR = "/sys/devices/system/cpu"
_ADDED_CPU = re.compile(rb"add@/devices/system/cpu/(cpu\d+)$")


def start(loop):
    """Listen for hot-added CPUs on `loop` and online any present one that is offline; returns
    the function that stops listening."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK,
                         NETLINK_KOBJECT_UEVENT)
    sock.bind((0, KERNEL_EVENTS_GROUP))
    loop.add_reader(sock.fileno(), _take_uevents, sock)
    for name in os.listdir(CPU_DIR):
        if re.fullmatch(r"cpu\d+", name) and _is_offline(name):
            online(name)

    def stop() -> None:
        loop.remove_reader(sock.fileno())
        sock.close()
    return stop


def online(name: str) -> None:
    try:
        with open(f"{CPU_DIR}/{name}/online", "w") as f:
            f.write("1")
        log.info("%s hot-added: online", name)
    except OSError as e:
        log.error("%s hot-added, but it cannot be onlined: %s", name, e)


def online_count() -> int:
    """vCPUs online now (/sys/devices/system/cpu/online: ranges such as "0-2,4")."""
    with open(f"{CPU_DIR}/online") as f:
        ranges = f.read().strip()
    return sum(int(b) - int(a) + 1 if b else 1
               for a, _, b in (part.partition("-") for part in ranges.split(",") if part))


def _is_offline(name: str) -> bool:
    try:
        with open(f"{CPU_DIR}/{name}/online") as f:
            return f.read().strip() == "0"
    except OSError:  # cpu0 has no `online` file: it cannot go offline
        return False


def _take_uevents(sock) -> None:
    while True:
        try:
            message, (sender, _) = sock.recvfrom(8192)
        except BlockingIOError:
            return
        if sender != 0:  # not the kernel's
            continue
        added = _ADDED_CPU.match(message.split(b"\0", 1)[0])
        if added:
            online(added.group(1).decode())
