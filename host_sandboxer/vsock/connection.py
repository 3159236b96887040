"""One vsock stream bridged to a host unix socket: its state, credit and host-side buffering.

Credit (virtio 1.2 §5.10.6.3): we may send the guest at most `peer_buf_alloc - (tx_cnt -
peer_fwd_cnt)` bytes; we advertise BUF_ALLOC and count in `fwd_cnt` only bytes really written
to the host socket, so a guest that respects credit never makes us buffer more than BUF_ALLOC.
"""

import socket

from .packet import HOST_CID, TYPE_STREAM

BUF_ALLOC = 256 * 1024
CREDIT_UPDATE_EVERY = BUF_ALLOC // 4

CONNECTING = "connecting"      # host-initiated: REQUEST sent, waiting for RESPONSE
ESTABLISHED = "established"
CLOSED = "closed"


class CreditViolation(Exception):
    """The guest sent more than the credit we granted."""


class Connection:
    __slots__ = ("sock", "fd", "guest_cid", "guest_port", "host_port", "key", "state",
                 "peer_buf_alloc", "peer_fwd_cnt", "tx_cnt", "fwd_cnt", "fwd_announced",
                 "pending", "host_eof", "guest_eof", "guest_rcv_shut", "reading", "writing",
                 "on_established", "timer")

    def __init__(self, sock: socket.socket, guest_cid: int, guest_port: int, host_port: int, state: str):
        self.sock = sock
        self.fd = sock.fileno()
        self.guest_cid = guest_cid
        self.guest_port = guest_port
        self.host_port = host_port
        self.key = (guest_port, host_port)
        self.state = state
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0            # bytes sent to the guest
        self.fwd_cnt = 0           # bytes from the guest written to the host socket
        self.fwd_announced = 0     # fwd_cnt the guest last heard from us
        self.pending = bytearray()  # guest bytes the host socket has not taken yet
        self.host_eof = False      # the host side sent EOF (guest was told SHUTDOWN send)
        self.guest_eof = False     # the guest will send no more
        self.guest_rcv_shut = False  # the guest will receive no more
        self.reading = False
        self.writing = False
        self.on_established = None  # host-initiated: called with our port once the guest accepts
        self.timer = None

    def credit(self) -> int:
        """Bytes we may still send to the guest."""
        return self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & 0xFFFFFFFF)

    def header(self, op: int, length: int = 0, flags: int = 0) -> tuple:
        """Header fields of a packet from the host end of this stream (announces fwd_cnt)."""
        self.fwd_announced = self.fwd_cnt
        return (HOST_CID, self.guest_cid, self.host_port, self.guest_port, length, TYPE_STREAM,
                op, flags, BUF_ALLOC, self.fwd_cnt & 0xFFFFFFFF)

    def wants_credit_update(self) -> bool:
        return self.fwd_cnt - self.fwd_announced >= CREDIT_UPDATE_EVERY

    def write(self, views: list) -> None:
        """Forwards guest payload to the host socket, buffering what it cannot take now.

        Raises OSError if the host socket is broken, CreditViolation if the guest overran us:
        checked before anything is copied, so the buffer never holds more than BUF_ALLOC.
        """
        size = sum(map(len, views))
        if len(self.pending) + size > BUF_ALLOC:
            raise CreditViolation(f"guest port {self.guest_port} overran its credit "
                                  f"({size} bytes with {len(self.pending)} buffered)")
        if not self.pending:
            try:
                sent = self.sock.send(views[0]) if len(views) == 1 else self.sock.sendmsg(views)
            except BlockingIOError:
                sent = 0
            self.fwd_cnt += sent
            for v in views:
                if sent >= len(v):
                    sent -= len(v)
                    continue
                self.pending += v[sent:]
                sent = 0
        else:
            for v in views:
                self.pending += v

    def flush(self) -> bool:
        """Writes buffered bytes; True when none are left. Raises OSError if the socket broke."""
        try:
            sent = self.sock.send(self.pending)
        except BlockingIOError:
            return False
        del self.pending[:sent]
        self.fwd_cnt += sent
        return not self.pending

    def close(self) -> None:
        self.state = CLOSED
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.sock.close()

