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


def exec_uptime() -> float:
    """Seconds after boot at which this program began. PID 1's task exists long before the
    kernel execs /init into it, so for PID 1 the kernel's "Run ... as init process" log record
    gives the time; any other process started with its exec (fork and exec are adjacent)."""
    if os.getpid() == 1:
        for record in _kernel_log():
            header, _, message = record.partition(";")
            if message.startswith("Run ") and " as init process" in message:
                return int(header.split(",")[2]) / 1e6
    return start_uptime()


def _kernel_log():
    """Records of /dev/kmsg ("prio,seq,usec,flags;message"), oldest first, without blocking."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return
    try:
        while True:
            try:
                yield os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                return
            except OSError:  # EPIPE: a record was overwritten meanwhile; read on
                continue
    finally:
        os.close(fd)


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
