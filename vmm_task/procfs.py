"""Small /proc readers shared by the ready line, the health service and the reaper."""

import os


def stat_fields(pid: int | str = "self") -> list[bytes]:
    """Fields of /proc/PID/stat after the parenthesised command name: [0] is the state (field 3
    in proc(5)), [1] the ppid, [19] the start time in clock ticks since boot."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rfind(b")") + 2:].split()


def start_uptime(pid: int | str = "self") -> float:
    """Seconds after boot at which the process was started."""
    return int(stat_fields(pid)[19]) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def count_zombie_children(parent: int) -> int:
    """Children of `parent` that have exited and not been reaped (state Z)."""
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = stat_fields(entry)
        except OSError:  # gone meanwhile
            continue
        if fields[0] == b"Z" and int(fields[1]) == parent:
            count += 1
    return count
