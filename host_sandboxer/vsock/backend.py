"""vhost-user back-end state machine for vhost-user-vsock-pci (QEMU's docs/interop/vhost-user.rst).

Serves one front-end (QEMU) connection on the event loop: negotiates features, maps guest RAM,
configures the rx/tx rings, watches kick eventfds and starts/stops the device. The message
order QEMU 7.2 uses is in HYBRID-VSOCK-NOTES.md; nothing here depends on it beyond the spec.
"""

import logging
import os
import socket
import struct

from . import vhost_user as vu
from .device import RX, TX, VsockDevice
from .guest_memory import GuestMemory, GuestMemoryError
from .virtqueue import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, Virtqueue, VirtqueueError

log = logging.getLogger(__name__)

VIRTIO_F_VERSION_1 = 1 << 32
FEATURES = (VIRTIO_F_VERSION_1 | vu.F_PROTOCOL_FEATURES | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC)
PROTOCOL_FEATURES = vu.PROTOCOL_F_REPLY_ACK | vu.PROTOCOL_F_CONFIG
NUM_QUEUES = 2   # rx and tx; QEMU keeps the event queue to itself
CONFIG = struct.Struct("<Q")   # struct virtio_vsock_config { le64 guest_cid; }
MAX_CONFIG_SIZE = 256          # VHOST_USER_MAX_CONFIG_SIZE


class RequestFailed(Exception):
    """A well-formed request we cannot honour: answered with a failed REPLY_ACK."""


class VhostUserBackend:
    def __init__(self, sock: socket.socket, device: VsockDevice, on_close=None):
        """Serves `sock` (an accepted front-end connection); `on_close(reason)` runs once at the end."""
        self.sock = sock
        self.device = device
        self.loop = device.loop
        self.on_close = on_close
        self.queues = [Virtqueue(i) for i in range(NUM_QUEUES)]
        self.features = 0
        self.protocol_features = 0
        self.memory = None
        self.closed = False
        self._reader = vu.MessageReader()
        self._handlers = {
            vu.GET_FEATURES: self._get_features,
            vu.SET_FEATURES: self._set_features,
            vu.SET_OWNER: lambda msg: None,
            vu.RESET_OWNER: self._reset_owner,
            vu.GET_PROTOCOL_FEATURES: lambda msg: vu.U64.pack(PROTOCOL_FEATURES),
            vu.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            vu.GET_QUEUE_NUM: lambda msg: vu.U64.pack(NUM_QUEUES),
            vu.SET_MEM_TABLE: self._set_mem_table,
            vu.SET_VRING_NUM: self._set_vring_num,
            vu.SET_VRING_ADDR: self._set_vring_addr,
            vu.SET_VRING_BASE: self._set_vring_base,
            vu.GET_VRING_BASE: self._get_vring_base,
            vu.SET_VRING_KICK: self._set_vring_fd("kick_fd"),
            vu.SET_VRING_CALL: self._set_vring_fd("call_fd"),
            vu.SET_VRING_ERR: self._set_vring_fd("err_fd"),
            vu.SET_VRING_ENABLE: self._set_vring_enable,
            vu.GET_CONFIG: self._get_config,
        }
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._on_readable)

    # -- transport --------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data, fds = vu.recv_chunk(self.sock)
        except BlockingIOError:
            return
        except (OSError, vu.ProtocolError) as e:
            self.close(f"front-end connection: {e}")
            return
        if not data:
            vu.close_fds(fds)
            self.close("front-end closed the connection")
            return
        pending = []
        try:
            pending = self._reader.feed(data, fds)
            while pending and not self.closed:
                self._dispatch(pending.pop(0))
        except vu.ProtocolError as e:
            self.close(f"protocol error: {e}")
        except OSError as e:
            self.close(f"front-end connection: {e}")
        except Exception as e:
            log.exception("vhost-user-vsock cid %d: unexpected error", self.device.guest_cid)
            self.close(f"internal error: {e}")
        for msg in pending:           # left undispatched by a session that ended
            vu.close_fds(msg.fds)

    def _dispatch(self, msg: vu.Message) -> None:
        handler = self._handlers.get(msg.request)
        if handler is None:
            vu.close_fds(msg.fds)
            log.warning("vhost-user: unsupported request %d", msg.request)
            self._ack(msg, ok=False)
            return
        try:
            reply = handler(msg)
        except (RequestFailed, VirtqueueError, GuestMemoryError) as e:
            log.error("vhost-user: request %d failed: %s", msg.request, e)
            self._ack(msg, ok=False)
            return
        finally:
            vu.close_fds(fd for fd in msg.fds if fd not in self._owned_fds())
        if reply is not None:
            self.sock.sendall(vu.encode_reply(msg.request, reply))
        else:
            self._ack(msg, ok=True)

    def _ack(self, msg: vu.Message, ok: bool) -> None:
        if msg.need_reply and self.protocol_features & vu.PROTOCOL_F_REPLY_ACK:
            self.sock.sendall(vu.encode_reply(msg.request, vu.U64.pack(0 if ok else 1)))

    def _owned_fds(self) -> set:
        return {fd for q in self.queues for fd in (q.kick_fd, q.call_fd, q.err_fd) if fd is not None}

    def close(self, reason: str) -> None:
        """Ends the session: the device stops, fds and mappings are released."""
        if self.closed:
            return
        self.closed = True
        log.info("vhost-user-vsock cid %d: session ended: %s", self.device.guest_cid, reason)
        self.loop.remove_reader(self.sock.fileno())
        self._stop_queues(reason)
        for q in self.queues:
            q.close()
        self._reader.close()
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        self.sock.close()
        if self.on_close is not None:
            self.on_close(reason)

    # -- features ---------------------------------------------------------------------

    def _get_features(self, msg):
        return vu.U64.pack(FEATURES)

    def _set_features(self, msg):
        (features,) = msg.unpack(vu.U64)
        if features & ~FEATURES:
            raise RequestFailed(f"features {features:#x} were not offered")
        self.features = features

    def _set_protocol_features(self, msg):
        (features,) = msg.unpack(vu.U64)
        if features & ~PROTOCOL_FEATURES:
            raise RequestFailed(f"protocol features {features:#x} were not offered")
        self.protocol_features = features

    def _get_config(self, msg):
        offset, size, flags = msg.unpack(vu.CONFIG_HEADER)
        if size > MAX_CONFIG_SIZE:
            raise vu.ProtocolError(f"GET_CONFIG of {size} bytes")
        config = CONFIG.pack(self.device.guest_cid)[offset:offset + size].ljust(size, b"\0")
        return vu.CONFIG_HEADER.pack(offset, size, flags) + config

    def _reset_owner(self, msg):
        self._stop_queues("front-end reset")
        self.features = 0

    # -- memory and rings -------------------------------------------------------------

    def _set_mem_table(self, msg):
        entries = vu.decode_mem_table(msg.payload)
        fds, msg.fds = msg.fds, []
        memory = GuestMemory.map(entries, fds)
        running = [q for q in self.queues if q.started]
        self._stop_queues("memory table changed")
        if self.memory is not None:
            self.memory.close()
        self.memory = memory
        if running:
            self._try_start()

    def _queue(self, index: int) -> Virtqueue:
        if not 0 <= index < NUM_QUEUES:
            raise RequestFailed(f"no queue {index}")
        return self.queues[index]

    def _set_vring_num(self, msg):
        index, num = msg.unpack(vu.VRING_STATE)
        self._queue(index).set_num(num)

    def _set_vring_addr(self, msg):
        index, _flags, desc, used, avail, _log = msg.unpack(vu.VRING_ADDR)
        q = self._queue(index)
        q.desc_uva, q.used_uva, q.avail_uva = desc, used, avail

    def _set_vring_base(self, msg):
        index, base = msg.unpack(vu.VRING_STATE)
        self._queue(index).last_avail = base & 0xFFFF

    def _get_vring_base(self, msg):
        index, _ = msg.unpack(vu.VRING_STATE)
        q = self._queue(index)
        self._stop_queues(f"queue {index} stopped")
        if q.kick_fd is not None:
            q.replace_fd("kick_fd", None)
        return vu.VRING_STATE.pack(index, q.last_avail)

    def _set_vring_fd(self, name: str):
        def handler(msg):
            (value,) = msg.unpack(vu.U64)
            q = self._queue(value & vu.VRING_IDX_MASK)
            fd = None if value & vu.VRING_NOFD_MASK or not msg.fds else msg.fds[0]
            if name != "kick_fd":
                q.replace_fd(name, fd)    # used from the next notification on
                return
            if fd is None:
                raise RequestFailed(f"queue {q.index}: polling mode is not supported")
            if q.started:                 # a running ring just listens on the new fd
                self.loop.remove_reader(q.kick_fd)
            q.replace_fd(name, fd)
            if q.started:
                self.loop.add_reader(fd, self._on_kick, q)
            if not self.features & vu.F_PROTOCOL_FEATURES:
                q.enabled = True          # without protocol features a kick fd starts the ring
            self._try_start()
        return handler

    def _set_vring_enable(self, msg):
        index, enable = msg.unpack(vu.VRING_STATE)
        q = self._queue(index)
        q.enabled = bool(enable)
        if q.enabled:
            self._try_start()
        else:
            self._stop_queues(f"queue {index} disabled")

    def _try_start(self) -> None:
        """Starts the device once both rings are fully configured and enabled."""
        if self.memory is None or not all(q.ready() for q in self.queues):
            return
        if all(q.started for q in self.queues):
            return
        try:
            for q in self.queues:
                q.start(self.memory, self.features)
        except GuestMemoryError:
            for q in self.queues:
                q.stop()
            raise
        for q in self.queues:
            self.loop.add_reader(q.kick_fd, self._on_kick, q)
        self.device.start(self.queues[RX], self.queues[TX])

    def _stop_queues(self, reason: str) -> None:
        if not any(q.started for q in self.queues):
            return
        for q in self.queues:
            if q.started:
                self.loop.remove_reader(q.kick_fd)
                q.stop()
        self.device.stop(reason)

    def _on_kick(self, q: Virtqueue) -> None:
        try:
            os.eventfd_read(q.kick_fd)
        except OSError:
            pass
        self.device.kick(q.index)

