"""The pod's shared files (resolv.conf, hosts, hostname) and sysctl names.

Written atomically (temp file + rename) so a container starting meanwhile never sees half a file.
"""

import os

from vmm_task.pod.podconfig import PodConfig

DEFAULT_HOSTS = ("127.0.0.1\tlocalhost\n"
                 "::1\tlocalhost ip6-localhost ip6-loopback\n"
                 "fe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\n"
                 "ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n")


def resolv_conf(config: PodConfig) -> str:
    lines = []
    if config.dns_searches:
        lines.append("search " + " ".join(config.dns_searches))
    lines += [f"nameserver {server}" for server in config.dns_servers]
    if config.dns_options:
        lines.append("options " + " ".join(config.dns_options))
    return "".join(line + "\n" for line in lines)


def hosts(hostname: str, addresses: list[str]) -> str:
    """localhost entries plus `hostname` for each of the pod's addresses (127.0.1.1 if none)."""
    if not hostname:
        return DEFAULT_HOSTS
    return DEFAULT_HOSTS + "".join(f"{address}\t{hostname}\n"
                                   for address in addresses or ["127.0.1.1"])


def write_atomic(path: str, text: str, mode: int = 0o644) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def sysctl_path(name: str) -> str:
    """/proc/sys path of a sysctl given as a.b.c or a/b/c (the slash form allows dots inside a
    component, e.g. net/ipv4/conf/eth0.100/rp_filter). Raises ValueError for names that could
    leave /proc/sys."""
    parts = name.split("/") if "/" in name else name.split(".")
    if not name or any(part in ("", ".", "..") or "\0" in part for part in parts):
        raise ValueError(f"invalid sysctl name {name!r}")
    return "/proc/sys/" + "/".join(parts)


def write_sysctl(name: str, value: str) -> None:
    """Set a sysctl; ValueError naming it when it does not exist or refuses the value."""
    import errno

    try:
        with open(sysctl_path(name), "w") as f:
            f.write(value)
    except FileNotFoundError:
        raise ValueError(f"no sysctl {name}") from None
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ERANGE):
            raise ValueError(f"sysctl {name} refuses {value!r}: {e.strerror}") from None
        raise


# sysctls that belong to the IPC namespace: applied inside the pod's own IPC namespace
IPC_SYSCTL_PREFIXES = ("kernel.shm", "kernel.msg", "kernel.sem", "fs.mqueue.")


def is_ipc_sysctl(name: str) -> bool:
    return name.replace("/", ".").startswith(IPC_SYSCTL_PREFIXES)
