"""Bring the loopback interface up with one ioctl (no netlink library at boot)."""

import fcntl
import socket
import struct

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
_IFREQ = "16sH22x"  # struct ifreq: name[IFNAMSIZ], short flags, padding to 40 bytes


def bring_up(name: str = "lo") -> None:
    """Set IFF_UP on `name`; raises OSError naming the interface on failure."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            request = struct.pack(_IFREQ, name.encode(), 0)
            _, flags = struct.unpack(_IFREQ, fcntl.ioctl(sock, SIOCGIFFLAGS, request))
            if not flags & IFF_UP:
                fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack(_IFREQ, name.encode(), flags | IFF_UP))
        except OSError as e:
            raise OSError(e.errno, f"cannot bring {name} up: {e.strerror}") from None
