"""The daemon's side of the node's task relay (serve.py): the process, and the Task API calls it
carries, served by the pods' ttrpc services.

`TaskRelay` starts the relay with the first pod's task address (or adopts the one an earlier
daemon left: `<dir>/task-relay.json`), hands it each pod's listening task.sock (LISTEN, the fd
passed with SCM_RIGHTS), and serves every containerd connection it reports (OPEN) as a ttrpc
server connection of vmm_common/ttrpc whose frames come and go over the one control connection
(`_Link`). If the relay process dies (containerd then sees its connections close) it is
started again and given every pod's listener anew; it is stopped with the last pod.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

from google.protobuf.message import DecodeError

from host_sandboxer.private_socket import listen_unix
from host_sandboxer.taskrelay import wire
from host_sandboxer.taskrelay.outbox import Outbox
from host_sandboxer.vmm.node_helper import HelperError, NodeHelper
from vmm_common.ttrpc import ProtocolError
from vmm_common.ttrpc import frame as fr
from vmm_common.protos.ttrpc.request_pb2 import Request
from vmm_common.ttrpc.connection import ServerConnection

log = logging.getLogger(__name__)

SYNC_TIMEOUT_S = 10.0
# Request metadata a replayed call carries when an earlier daemon had begun answering it
# (wire.RESUMED): its handler goes on with it (taskproxy/streaming.py does not ack a stream twice).
RESUMED_METADATA = "vmm-sandboxer-resumed"
RECV_CHUNK = 256 * 1024
LISTEN_BACKLOG = 128  # containerd's dials wait here while no relay accepts (one is being started)


class RelayError(RuntimeError):
    pass


class TaskRelay:
    def __init__(self, state_dir: Path, services):
        """`services(pod_id)`: the ttrpc.Server with that pod's Task API, None if no such pod."""
        self.helper = NodeHelper(state_dir, "task-relay", "host_sandboxer.taskrelay.serve")
        self.services = services
        self.addresses: dict[str, Path] = {}  # pod id -> its task.sock: what the relay must serve
        self._link: _Link | None = None
        self._lock = asyncio.Lock()
        self._watch: asyncio.Task | None = None  # awaits the exit of the process `_watched`
        self._watched = None

    async def resume(self, addresses: dict[str, Path]) -> None:
        """At daemon start: take over the relay an earlier daemon left (its connections and the
        calls it kept come with it), and make it serve exactly `addresses` (a listener made for
        each it lacks: it died meanwhile, or never ran)."""
        async with self._lock:
            self.addresses = dict(addresses)
            if self.helper.adopt():
                await self._connect()
            held = self._link.listening if self._link is not None else set()
            for pod in sorted(held - set(addresses)):
                self._link.send(wire.UNLISTEN, 0, pod.encode())
            await self._serve_each(sorted(set(addresses) - held))
            if not addresses and self.helper.proc is not None:
                await self._stop()

    async def listen(self, pod_id: str, path: Path) -> None:
        """Serve pod `pod_id`'s Task API at `path` from now on (RelayError if the relay cannot start)."""
        async with self._lock:
            self.addresses[pod_id] = path
            await self._serve([pod_id])

    async def unlisten(self, pod_id: str) -> None:
        """The pod is gone: its listener and containerd's connections to it close; the relay
        ends with the last pod."""
        async with self._lock:
            if self.addresses.pop(pod_id, None) is None:
                return
            if self._link is not None and not self._link.ended.done():
                self._link.send(wire.UNLISTEN, 0, pod_id.encode())
            if not self.addresses:
                await self._stop()

    async def close(self, held: frozenset = frozenset(), drain_s: float = 0.0) -> None:
        """The daemon is leaving: the relay keeps everything for the next one. Calls under way,
        but those of the `held` methods (held open for good, e.g. Wait), are first given
        `drain_s` to be answered, while new ones are left to the relay: a call with effects is
        not cut halfway and replayed."""
        if self._watch is not None:
            self._watch.cancel()
        if self._link is not None:
            await self._link.drain(held, drain_s)
            await self._link.close()

    async def _serve_each(self, pods: list[str]) -> None:
        """`_serve` for each pod; one that fails is logged (its task address is not served)."""
        for pod in pods:
            try:
                await self._serve([pod])
            except RelayError as e:
                log.error("%s; its task address is not served", e)

    async def _serve(self, pods: list[str]) -> None:
        """Give the relay a listener for each of `pods`, starting it (and connecting) first."""
        try:
            spawned = await self.helper.ensure_running()
        except OSError as e:
            raise RelayError(f"task relay: cannot start: {e}") from None
        if spawned or self._link is None or self._link.ended.done():
            await self._connect()
        for pod in pods:
            try:
                listener = listen_unix(str(self.addresses[pod]), LISTEN_BACKLOG)
            except OSError as e:
                raise RelayError(f"pod {pod}: task address {self.addresses[pod]}: {e}") from None
            self._link.send(wire.LISTEN, 0, pod.encode(), passing=listener)
            self._link.listening.add(pod)

    async def _connect(self) -> None:
        """A link to the relay, once it has told us what it holds (RelayError if it does not)."""
        try:
            self._link = _Link(await self.helper.connect(), self.services)
            await asyncio.wait_for(asyncio.shield(self._link.synced), SYNC_TIMEOUT_S)
        except asyncio.TimeoutError:  # before OSError: it is one
            raise RelayError(f"task relay: no state within {SYNC_TIMEOUT_S:g} s") from None
        except (HelperError, OSError) as e:
            raise RelayError(f"task relay: {e}") from None
        if self._watched is not self.helper.proc:
            self._watched = self.helper.proc
            self._watch = asyncio.ensure_future(self._watch_exit(self._watched))

    async def _stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._link is not None:
            await self._link.close()
            self._link = None
        await self.helper.stop()

    async def _watch_exit(self, proc) -> None:
        """The relay died: containerd has seen every connection close (it takes their tasks for
        exited). Start a new one, so that its tasks can be reached again."""
        await proc.wait()
        log.error("%s: containerd's connections to %d pod(s) are lost; starting it again",
                  self.helper.describe_end(), len(self.addresses))
        async with self._lock:
            if self._link is not None:
                await self._link.close()
                self._link = None
            await self._serve_each(sorted(self.addresses))


class _Link:
    """One control connection to the relay: a ttrpc server connection per containerd one."""

    def __init__(self, sock: socket.socket, services):
        self.sock = sock
        self.services = services
        loop = asyncio.get_running_loop()
        self.outbox = Outbox(loop, sock, lambda why: log.error("task relay link: write failed: %s", why),
                             on_written=self._written)
        self._flush_waiters: list[tuple[int, asyncio.Future]] = []  # (outbox.written target, waiter)
        self.channels: dict[int, _RelayedChannel] = {}
        self.unanswered: dict[tuple[int, int], str] = {}  # (connection, stream) -> method
        self.listening: set[str] = set()  # pods whose listener the relay holds
        self._draining = False
        self.synced = loop.create_future()
        self.ended = loop.create_future()
        self._reader = asyncio.ensure_future(self._read())

    def send(self, kind: int, conn: int, payload: bytes = b"", passing: socket.socket | None = None) -> None:
        self.outbox.write(wire.message(kind, conn, payload), payload, passing=passing)

    async def flushed(self) -> None:
        """Return once everything queued so far is in the relay's socket: out of this process's
        hands, so a daemon killed now does not lose it (the relay lives on).
        ConnectionResetError if the link ends first."""
        target = self.outbox.queued
        if self.outbox.written >= target:
            return
        if self.ended.done():
            raise ConnectionResetError("the link to the task relay is closed")
        waiter = asyncio.get_running_loop().create_future()
        self._flush_waiters.append((target, waiter))
        await waiter

    def _written(self) -> None:
        waiting = []
        for target, waiter in self._flush_waiters:
            if target > self.outbox.written:
                waiting.append((target, waiter))
            elif not waiter.done():
                waiter.set_result(None)
        self._flush_waiters = waiting

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        buffer = bytearray()
        reason = "the relay closed the link"
        try:
            while data := await loop.sock_recv(self.sock, RECV_CHUNK):
                buffer += data
                for conn, kind, flags, message in wire.take(buffer, wire.MAX_CONTROL_PAYLOAD):
                    self._on_message(conn, kind, flags, message[wire.HEADER_SIZE:])
        except (OSError, wire.WireError, UnicodeDecodeError) as e:
            reason = f"link broken: {e}"
            log.error("task relay: %s", reason)
        finally:
            if not self._draining:
                self._end()
            if not self.synced.done():
                self.synced.set_exception(RelayError(f"task relay: {reason}"))
            self.ended.set_result(reason)

    def _on_message(self, conn: int, kind: int, flags: int, payload: bytes) -> None:
        if kind == wire.RECEIVED:
            channel = self.channels.get(conn)
            if channel is not None:
                channel.received(payload, resumed=bool(flags & wire.RESUMED))
        elif kind == wire.OPEN:
            self._open(conn, payload.decode())
        elif kind == wire.CLOSED:
            channel = self.channels.get(conn)
            if channel is not None:
                channel.end()
        elif kind == wire.LISTENING:
            self.listening.add(payload.decode())
        elif kind == wire.SYNCED:
            if not self.synced.done():
                self.synced.set_result(None)
        else:
            raise wire.WireError(f"unexpected control message kind {kind}")

    def _open(self, conn: int, pod_id: str) -> None:
        server = self.services(pod_id)
        if server is None:
            log.warning("task relay: connection %d for unknown pod %r closed", conn, pod_id)
            self.send(wire.CLOSE, conn)
            return
        channel = self.channels[conn] = _RelayedChannel(self, conn)
        task = asyncio.ensure_future(
            ServerConnection(server.lookup, channel, f"containerd (relayed #{conn}, pod {pod_id})").run())
        task.add_done_callback(lambda _: self.channels.pop(conn, None))

    async def drain(self, held: frozenset, timeout: float) -> None:
        """Read no more, and wait up to `timeout` for the calls under way (but `held` ones) to
        be answered and their answers written to the relay."""
        self._draining = True
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        deadline = asyncio.get_running_loop().time() + timeout
        while set(self.unanswered.values()) - held or self.outbox.size:
            if asyncio.get_running_loop().time() > deadline:
                log.warning("task relay: leaving with calls unanswered (the next daemon gets them): %s",
                            ", ".join(sorted(set(self.unanswered.values()) - held)))
                break
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        self._end()

    def _end(self) -> None:
        self.outbox.close()
        self.sock.close()  # the relay keeps containerd's calls for the next link
        for _, waiter in self._flush_waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("the link to the task relay closed"))
        self._flush_waiters.clear()
        for channel in list(self.channels.values()):
            channel.end()


class _RelayedChannel:
    """What vmm_common/ttrpc's ServerConnection reads and writes (Channel's recv/send/close),
    for one containerd connection that the relay carries."""

    def __init__(self, link: _Link, conn: int):
        self._link = link
        self._conn = conn
        self._frames: asyncio.Queue = asyncio.Queue()  # bounded by the relay's per-connection limits
        self._ended = False

    def received(self, data: bytes, resumed: bool = False) -> None:
        try:
            length, stream_id, msg_type, flags = fr.decode_header(data[:fr.HEADER_SIZE])
        except ProtocolError as e:
            log.warning("task relay: connection %d: %s", self._conn, e)
            self._link.send(wire.CLOSE, self._conn)
            self.end()
            return
        body = data[fr.HEADER_SIZE:]
        if msg_type == fr.REQUEST:
            request = _request_of(body)
            self._link.unanswered[self._conn, stream_id] = request.method if request else ""
            if resumed and request is not None:
                request.metadata.add(key=RESUMED_METADATA, value="1")
                body = request.SerializeToString()
        self._frames.put_nowait(fr.Frame(stream_id, msg_type, flags, body))

    def end(self) -> None:
        """No more frames: containerd closed the connection, or the link to the relay ended."""
        if not self._ended:
            self._ended = True
            self._frames.put_nowait(None)
            for call in [c for c in self._link.unanswered if c[0] == self._conn]:
                del self._link.unanswered[call]

    async def recv(self) -> fr.Frame | None:
        return await self._frames.get()

    async def send(self, stream_id: int, msg_type: int, flags: int, data: bytes = b"") -> None:
        if self._ended:
            raise ConnectionResetError("the connection through the task relay is closed")
        self._link.send(wire.SEND, self._conn, fr.encode(stream_id, msg_type, flags, data))
        if wire.ends_stream(msg_type, flags):
            self._link.unanswered.pop((self._conn, stream_id), None)
        await self._link.flushed()  # what a caller counts as sent (a stream's mark) is with the relay

    async def close(self) -> None:
        if not self._ended and not self._link.ended.done():
            self._link.send(wire.CLOSE, self._conn)
        self.end()


def _request_of(envelope: bytes) -> Request | None:
    """A request's envelope (None if undecodable: ServerConnection refuses it)."""
    try:
        return Request.FromString(envelope)
    except DecodeError:
        return None
