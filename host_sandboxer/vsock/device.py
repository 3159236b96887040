"""The virtio-vsock device: rx/tx queues <-> host unix sockets, one connection table per VM.

Runs entirely in event-loop callbacks. The guest is untrusted: a malformed ring makes the
device log, drop every connection and ignore its queues until the driver restarts them (the
`fail` path); a malformed packet only costs its own connection an RST. Nothing raises out.

One loop serves every VM, so each callback has a `Budget`: so many chains, descriptors and
payload bytes, after which the rest of the work is left to a later turn (tx and control
packets: rescheduled; host data: the socket is still readable) and the other VMs are served.

Ordering: control packets (RESPONSE, RST, SHUTDOWN, CREDIT_*) wait in `control` for rx
buffers, and no data is read from a host socket while any are waiting, so a stream's packets
reach the guest in the order they were produced.
"""

import collections
import itertools
import logging
import socket

from .connection import CLOSED, CONNECTING, ESTABLISHED, Connection, CreditViolation
from .guest_memory import GuestMemoryError
from .packet import (HEADER, HEADER_SIZE, HOST_CID, MAX_PAYLOAD, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE,
                     OP_NAMES, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV,
                     SHUTDOWN_SEND, TYPE_STREAM, read_header, slice_views, write_header)
from .virtqueue import VirtqueueError

log = logging.getLogger(__name__)

RX, TX = 0, 1
BATCH = 64                   # chains handled per callback before yielding to other VMs
BATCH_DESCRIPTORS = 512      # descriptors walked per callback (a chain may be as long as its queue)
BATCH_BYTES = 1 << 20        # payload bytes moved per callback
BURST = 16                   # rx buffers filled by one recvmsg from a host socket
MAX_CONNECTIONS = 1024
MAX_CONTROL = 4096           # control packets waiting for rx buffers (a guest may never post any)
CONNECT_TIMEOUT = 10.0
DRAIN_TIMEOUT = 30.0         # how long a closed stream may take to hand its last bytes to the host
FIRST_HOST_PORT = 1 << 30    # ports we pick for host-initiated streams


class Budget:
    """The work one event-loop callback may still do for this VM (see the module docstring).
    A pop attempt costs a chain even when the ring is dry, so a guest that races its avail
    index cannot keep a callback spinning either."""
    __slots__ = ("chains", "descriptors", "bytes")

    def __init__(self):
        self.chains, self.descriptors, self.bytes = BATCH, BATCH_DESCRIPTORS, BATCH_BYTES

    def spend(self, chains: list = (), attempts: int = 1) -> None:
        self.chains -= attempts
        self.descriptors -= sum(chain.descriptors() for chain in chains)

    def spent(self) -> bool:
        return self.chains <= 0 or self.descriptors <= 0 or self.bytes <= 0


def guarded(method):
    """Event-loop entry points: a malformed ring fails the device, nothing escapes; each
    callback gets a fresh Budget (a guarded method called by another shares the caller's)."""
    def wrapper(self, *args):
        outermost = self.budget is None
        if outermost:
            self.budget = Budget()
        try:
            method(self, *args)
        except (VirtqueueError, GuestMemoryError, ValueError) as e:
            self.fail(f"{type(e).__name__}: {e}")
        except Exception:
            log.exception("vsock cid %d: unexpected error", self.guest_cid)
            self.fail("internal error")
        finally:
            if outermost:
                self.budget = None
    wrapper.__name__ = method.__name__
    return wrapper


class VsockDevice:
    def __init__(self, guest_cid: int, dial, loop, on_fail=None):
        """`dial(port) -> socket | None` opens the host end of a guest-initiated stream;
        `loop`: asyncio's or reactor.Reactor (the callback methods only); `on_fail(reason)`
        hears of every reset caused by a malformed ring."""
        self.guest_cid = guest_cid
        self.dial = dial
        self.on_fail = on_fail
        self.loop = loop
        self.rxq = self.txq = None
        self.conns = {}
        self.control = collections.deque()
        self.rx_waiters = {}          # connections parked until the guest posts rx buffers (ordered set)
        self.broken = None            # why the device stopped serving its queues
        self.budget = None            # the running callback's Budget
        self._ports = itertools.count(FIRST_HOST_PORT)
        self._tx_scheduled = False
        self._rx_scheduled = False    # a kick(RX) is due: control packets past a callback's budget
        self._control_dropped = 0

    @property
    def running(self) -> bool:
        return self.rxq is not None and self.broken is None

    # -- lifecycle (called by the vhost-user backend) ----------------------------------

    def start(self, rxq, txq) -> None:
        self.rxq, self.txq, self.broken = rxq, txq, None
        self.kick(TX)
        self.kick(RX)

    def stop(self, reason: str) -> None:
        """The driver stopped the queues (or QEMU went away): every stream ends."""
        if self.conns:
            log.info("vsock cid %d: dropping %d connection(s): %s", self.guest_cid, len(self.conns), reason)
        self.rxq = self.txq = None
        self._reset_all()

    def fail(self, reason: str) -> None:
        log.error("vsock cid %d: device reset: %s", self.guest_cid, reason)
        self.broken = reason
        self._reset_all()
        if self.on_fail is not None:
            self.on_fail(reason)

    def _reset_all(self) -> None:
        self.control.clear()
        self.rx_waiters.clear()
        for conn in list(self.conns.values()):
            self._forget(conn)
            conn.close()

    # -- host side --------------------------------------------------------------------

    @guarded
    def connect_from_host(self, sock: socket.socket, port: int, on_established) -> None:
        """Opens a stream to guest `port`; `on_established(host_port)` runs once the guest accepts.
        The socket is closed if the guest refuses or the device is not running."""
        if not self.running or len(self.conns) >= MAX_CONNECTIONS:
            sock.close()
            return
        host_port = next(p for p in self._ports if (port, p & 0xFFFFFFFF) not in self.conns) & 0xFFFFFFFF
        conn = Connection(sock, self.guest_cid, port, host_port, CONNECTING)
        conn.on_established = on_established
        conn.timer = self.loop.call_later(CONNECT_TIMEOUT, self._connect_timeout, conn)
        self.conns[conn.key] = conn
        self._send_control(conn, OP_REQUEST)

    @guarded
    def _connect_timeout(self, conn: Connection) -> None:
        conn.timer = None
        if conn.state == CONNECTING:
            log.info("vsock cid %d: guest port %d did not answer", self.guest_cid, conn.guest_port)
            self._drop(conn, rst=True)

    def _update_reading(self, conn: Connection) -> None:
        want = (conn.state == ESTABLISHED and self.running and not conn.host_eof
                and not conn.guest_rcv_shut and conn.credit() > 0 and conn not in self.rx_waiters)
        if want != conn.reading:
            conn.reading = want
            if want:
                self.loop.add_reader(conn.fd, self._on_host_readable, conn)
            else:
                self.loop.remove_reader(conn.fd)

    def _park(self, conn: Connection) -> None:
        """No rx buffer for `conn`'s data: wait for the guest's next rx kick."""
        self.rx_waiters[conn] = None
        self._update_reading(conn)
        if self.rxq.arm():
            self.loop.call_soon(self.kick, RX)

    @guarded
    def _on_host_readable(self, conn: Connection) -> None:
        if conn.state != ESTABLISHED or not self.running:
            return
        if self.control and not self._flush_control():
            self._park(conn)
            return
        while self._receive_burst(conn) and not self.budget.spent():
            pass                      # what is left waits for the next turn: the socket stays readable
        self.rxq.publish()
        self._update_reading(conn)

    def _receive_burst(self, conn: Connection) -> bool:
        """One recvmsg from the host socket straight into up to BURST rx buffers; True to go on."""
        rxq, budget = self.rxq, self.budget
        room = min(conn.credit(), BURST * MAX_PAYLOAD, budget.bytes)
        if room <= 0:
            return False
        want = min(BURST, budget.chains)
        chains = rxq.pop_many(want, budget.descriptors)
        budget.spend(chains, want)
        dry = len(chains) < want and budget.descriptors > 0
        taken, views = [], []
        for chain in chains:
            if room <= 0:
                break
            writable = chain.writable
            if len(writable) == 1 and len(writable[0]) > HEADER_SIZE:   # Linux 6.1: one buffer each
                size = min(len(writable[0]) - HEADER_SIZE, room, MAX_PAYLOAD)
                views.append(writable[0][HEADER_SIZE:HEADER_SIZE + size])
            else:
                payload = slice_views(writable, HEADER_SIZE, min(room, MAX_PAYLOAD))
                if not payload:
                    raise VirtqueueError(f"rx buffer of {sum(map(len, writable))} bytes holds no payload")
                size = sum(map(len, payload))
                views += payload
            taken.append((chain, size))
            room -= size
        self._rollback(rxq, len(chains) - len(taken))
        if not taken:
            self._park(conn)
            return False
        try:
            n = conn.sock.recv_into(views[0]) if len(views) == 1 else conn.sock.recvmsg_into(views)[0]
        except BlockingIOError:
            n = None
        except OSError:
            self._rollback(rxq, len(taken))
            self._drop(conn, rst=True)
            return False
        used = self._fill(conn, taken, n) if n else []
        budget.bytes -= n or 0
        self._rollback(rxq, len(taken) - len(used))
        rxq.push_many(used)
        if n == 0:
            self._host_eof(conn)
        elif n and dry and len(used) == len(chains):
            self._park(conn)
            return False
        # A short read means the socket is drained: asking again would only raise EAGAIN.
        return bool(n) and n == sum(size for _, size in taken)

    def _fill(self, conn: Connection, taken: list, n: int) -> list:
        """Writes the RW headers for `n` bytes received into `taken` buffers: their used entries."""
        fields = conn.header(OP_RW)
        before, after = fields[:4], fields[5:]    # around the length field
        pack = HEADER.pack_into
        used = []
        for chain, size in taken:
            part = min(size, n)
            first = chain.writable[0]
            if len(first) >= HEADER_SIZE:
                pack(first, 0, *before, part, *after)
            else:
                write_header(chain.writable, before + (part,) + after)
            used.append((chain.head, HEADER_SIZE + part))
            n -= part
            if n <= 0:
                break
        conn.tx_cnt += sum(length - HEADER_SIZE for _, length in used)
        return used

    @staticmethod
    def _rollback(rxq, count: int) -> None:
        for _ in range(count):
            rxq.rollback()

    def _host_eof(self, conn: Connection) -> None:
        conn.host_eof = True
        if conn.guest_eof:
            self._drop(conn, rst=True)
        else:
            self._send_control(conn, OP_SHUTDOWN, SHUTDOWN_SEND)

    @guarded
    def _on_host_writable(self, conn: Connection) -> None:
        try:
            drained = conn.flush()
        except OSError:
            drained = None
        if conn.state == CLOSED:            # a dropped stream handing over its last bytes
            if drained is not False:
                self._abandon(conn)
            return
        if drained is None:
            self._drop(conn, rst=True)
            return
        if drained:
            self.loop.remove_writer(conn.fd)
            conn.writing = False
            self._host_write_done(conn)
        if conn.wants_credit_update() and self.running:
            self._send_control(conn, OP_CREDIT_UPDATE)

    def _host_write_done(self, conn: Connection) -> None:
        if conn.guest_eof:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    # -- guest side -------------------------------------------------------------------

    @guarded
    def kick(self, index: int) -> None:
        if index == RX:
            self._rx_scheduled = False     # this is the kick that was due
        if not self.running:
            return
        if index == RX:
            if self._flush_control():
                waiters = list(self.rx_waiters)
                self.rx_waiters.clear()
                for conn in waiters:
                    self._update_reading(conn)
        elif not self._tx_scheduled:
            self._process_tx()

    @guarded
    def _process_tx(self) -> None:
        self._tx_scheduled = False
        if not self.running:       # stopped while this call was scheduled
            return
        txq, budget = self.txq, self.budget
        while not budget.spent():
            chain = txq.pop()
            budget.spend((chain,) if chain else ())
            if chain is None:
                txq.publish()
                if not txq.arm():
                    break
                continue
            self._handle_packet(chain.readable)
            txq.push(chain.head, 0)
            if not self.running:       # the packet stopped the device
                return
        else:
            self._tx_scheduled = True
            self.loop.call_soon(self._process_tx)
        txq.publish()
        if self.control:
            self._flush_control()

    def _handle_packet(self, views: list) -> None:
        try:
            (src_cid, dst_cid, src_port, dst_port, length, kind, op, flags, buf_alloc,
             fwd_cnt) = read_header(views)
        except ValueError as e:
            log.warning("vsock cid %d: dropped a packet: %s", self.guest_cid, e)
            return
        if src_cid != self.guest_cid or dst_cid != HOST_CID:
            log.warning("vsock cid %d: dropped a packet from cid %d to cid %d",
                        self.guest_cid, src_cid, dst_cid)
            return
        key = (src_port, dst_port)
        conn = self.conns.get(key)
        if op == OP_RST:
            if conn is not None:
                self._drop(conn, rst=False)
            return
        if kind != TYPE_STREAM or op not in OP_NAMES:
            self._refuse(key, conn, f"type {kind} op {op}")
            return
        if op == OP_REQUEST:
            self._guest_connect(key, conn, buf_alloc, fwd_cnt)
            return
        if conn is None:
            self._send_rst(key)
            return
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        if op == OP_RESPONSE:
            self._guest_accepted(conn)
        elif conn.state != ESTABLISHED:
            self._refuse(key, conn, f"{OP_NAMES[op]} before RESPONSE")
        elif op == OP_RW:
            if length > MAX_PAYLOAD or HEADER_SIZE + length > sum(map(len, views)):
                self._refuse(key, conn, f"RW claims {length} bytes")
            elif length:
                self.budget.bytes -= length
                self._guest_data(conn, slice_views(views, HEADER_SIZE, length))
        elif op == OP_CREDIT_REQUEST:
            self._send_control(conn, OP_CREDIT_UPDATE)
        elif op == OP_SHUTDOWN:
            self._guest_shutdown(conn, flags)
        if conn.state == ESTABLISHED:
            self._update_reading(conn)

    def _guest_connect(self, key: tuple, conn, buf_alloc: int, fwd_cnt: int) -> None:
        if conn is not None:
            self._refuse(key, conn, "duplicate REQUEST")
            return
        sock = self.dial(key[1]) if len(self.conns) < MAX_CONNECTIONS else None
        if sock is None:
            self._send_rst(key)
            return
        conn = Connection(sock, self.guest_cid, key[0], key[1], ESTABLISHED)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        self.conns[key] = conn
        self._send_control(conn, OP_RESPONSE)
        self._update_reading(conn)

    def _guest_accepted(self, conn: Connection) -> None:
        if conn.state != CONNECTING:
            self._refuse(conn.key, conn, "unexpected RESPONSE")
            return
        conn.state = ESTABLISHED
        conn.timer.cancel()
        conn.timer = None
        try:
            conn.on_established(conn.host_port)
        except OSError:
            self._drop(conn, rst=True)

    def _guest_data(self, conn: Connection, payload: list) -> None:
        if conn.guest_eof:
            self._refuse(conn.key, conn, "data after SHUTDOWN")
            return
        try:
            conn.write(payload)
        except CreditViolation as e:
            self._refuse(conn.key, conn, str(e))
            return
        except OSError:
            self._drop(conn, rst=True)
            return
        if conn.pending and not conn.writing:
            conn.writing = True
            self.loop.add_writer(conn.fd, self._on_host_writable, conn)
        if conn.wants_credit_update():
            self._send_control(conn, OP_CREDIT_UPDATE)

    def _guest_shutdown(self, conn: Connection, flags: int) -> None:
        if flags & SHUTDOWN_RCV:
            conn.guest_rcv_shut = True
        if flags & SHUTDOWN_SEND and not conn.guest_eof:
            conn.guest_eof = True
            if not conn.pending:
                self._host_write_done(conn)
        # Linux sends SHUTDOWN(both) on close() and waits for our RST.
        if conn.guest_eof and (conn.guest_rcv_shut or conn.host_eof):
            self._drop(conn, rst=True)

    def _refuse(self, key: tuple, conn, why: str) -> None:
        log.warning("vsock cid %d: reset guest port %d -> host port %d: %s",
                    self.guest_cid, key[0], key[1], why)
        if conn is not None:
            self._drop(conn, rst=True)
        else:
            self._send_rst(key)

    # -- teardown ---------------------------------------------------------------------

    def _forget(self, conn: Connection) -> None:
        self.conns.pop(conn.key, None)
        self.rx_waiters.pop(conn, None)
        if conn.reading:
            self.loop.remove_reader(conn.fd)
            conn.reading = False
        if conn.writing:
            self.loop.remove_writer(conn.fd)
            conn.writing = False

    def _drop(self, conn: Connection, rst: bool) -> None:
        """Ends a stream; bytes the guest already sent still reach the host socket."""
        if conn.state == CLOSED:
            return
        self._forget(conn)
        if rst and self.running:
            self._send_control(conn, OP_RST)
        if conn.pending and conn.state == ESTABLISHED:
            conn.state = CLOSED
            if conn.timer is not None:
                conn.timer.cancel()
            conn.timer = self.loop.call_later(DRAIN_TIMEOUT, self._abandon, conn)
            self.loop.add_writer(conn.fd, self._on_host_writable, conn)
            return
        conn.close()

    def _abandon(self, conn: Connection) -> None:
        """Closes a dropped stream that was handing its last bytes to the host."""
        self.loop.remove_writer(conn.fd)
        conn.close()

    # -- rx ring: packets to the guest ------------------------------------------------

    def _send_control(self, conn: Connection, op: int, flags: int = 0) -> None:
        self._queue_control((conn, op, flags))

    def _send_rst(self, key: tuple) -> None:
        self._queue_control((HOST_CID, self.guest_cid, key[1], key[0], 0, TYPE_STREAM, OP_RST, 0, 0, 0))

    def _queue_control(self, item: tuple) -> None:
        if len(self.control) >= MAX_CONTROL:
            self._control_dropped += 1
            if self._control_dropped == 1:
                log.warning("vsock cid %d: guest posts no rx buffers; dropping control packets",
                            self.guest_cid)
            return
        self.control.append(item)
        self._flush_control()

    def _flush_control(self) -> bool:
        """Writes waiting control packets into rx buffers; True when none are left. Those past
        the callback's budget wait for a kick(RX) scheduled here, as if the guest had kicked."""
        rxq, budget = self.rxq, self.budget
        if rxq is None:
            return False
        control = self.control
        wrote = False
        while control:
            if budget.spent() or self._rx_scheduled:
                if not self._rx_scheduled:
                    self._rx_scheduled = True
                    self.loop.call_soon(self.kick, RX)
                break
            chain = rxq.pop()
            budget.spend((chain,) if chain else ())
            if chain is None:
                if rxq.arm():
                    continue
                break
            item = control.popleft()      # (conn, op, flags), or a whole header for a stranger
            if len(item) == 3:
                conn, op, flags = item
                item = conn.header(op, 0, flags)
            write_header(chain.writable, item)
            rxq.push(chain.head, HEADER_SIZE)
            wrote = True
        if wrote:
            rxq.publish()
        return not control

