"""One pod's port-forwarding: a listener on 127.0.0.1 inside the pod's network namespace, the
NAT rule sending the namespace's localhost TCP to it (redirect.py), and a relay per connection
into the guest agent's port-forward stream (vmm_common.portforward).

All on the daemon's event loop: no thread per connection, bounded buffers per relay
(vmm_common.splice); a guest that does not answer within ANSWER_TIMEOUT_S gets the client's
connection reset, as does a connection beyond MAX_CONNECTIONS per pod.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import Awaitable, Callable

from host_sandboxer.network.errors import NamespaceGone, NetworkError
from host_sandboxer.network.netns import in_netns
from host_sandboxer.portforward import redirect
from vmm_common import portforward as protocol
from vmm_common.fdio import read_line
from vmm_common.splice import reset_socket, splice

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h: the destination before NAT
LISTEN_BACKLOG = 128
ANSWER_TIMEOUT_S = 30.0  # the guest connects to its loopback (5 s per address) and answers
MAX_CONNECTIONS = 256    # per pod, relayed at once

Connect = Callable[[], Awaitable[socket.socket]]  # -> a stream to the agent's port-forward port


def original_port(sock: socket.socket) -> int:
    """The TCP port the client dialled before the redirect."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # struct sockaddr_in
    return int.from_bytes(raw[2:4], "big")


def _listen_and_redirect(netns_path: str) -> socket.socket:
    """In the pod namespace's thread: the listener, then the rule pointing at it."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(LISTEN_BACKLOG)
        listener.setblocking(False)
        redirect.install(listener.getsockname()[1])
    except (NetworkError, OSError) as e:
        listener.close()
        raise NetworkError(f"network namespace {netns_path}: port-forwarding: {e}") from None
    except BaseException:
        listener.close()
        raise
    return listener


async def remove_redirect(netns_path: str) -> None:
    """Delete the rule from the namespace (one an earlier daemon left); a namespace already gone
    took it along."""
    try:
        await in_netns(netns_path, redirect.remove)
    except NamespaceGone:
        pass


class PortForwarder:
    def __init__(self, pod_id: str, netns_path: str, listener: socket.socket, connect: Connect):
        self.pod_id = pod_id
        self.netns_path = netns_path
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._connect = connect
        self._relays: set[asyncio.Task] = set()
        self._accepting = asyncio.create_task(self._accept(), name=f"port-forward-{pod_id}")

    @classmethod
    async def open(cls, pod_id: str, netns_path: str, connect: Connect) -> "PortForwarder":
        """Listen in the namespace at `netns_path` and redirect its localhost TCP there;
        `connect()` opens a stream to the guest's port-forward port. NetworkError naming the
        namespace if it cannot be done (nothing left behind)."""
        work = asyncio.ensure_future(in_netns(netns_path, lambda: _listen_and_redirect(netns_path)))
        try:
            listener = await asyncio.shield(work)
        except asyncio.CancelledError:  # the namespace thread goes on: undo what it made
            await asyncio.wait({work})
            if not work.cancelled() and work.exception() is None:
                work.result().close()
                await remove_redirect(netns_path)
            raise
        return cls(pod_id, netns_path, listener, connect)

    async def close(self) -> None:
        """Stop accepting, reset every relayed connection, remove the rule."""
        self._accepting.cancel()
        for task in self._relays:
            task.cancel()
        await asyncio.gather(self._accepting, *self._relays, return_exceptions=True)
        self._listener.close()
        await remove_redirect(self.netns_path)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _ = await loop.sock_accept(self._listener)
                client.setblocking(False)
            except OSError as e:  # EMFILE and the like: a pause, not the end of the forwarder
                log.warning("pod %s: port-forward accept: %s", self.pod_id, e)
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._relay(client))
            self._relays.add(task)
            task.add_done_callback(self._relays.discard)

    async def _relay(self, client: socket.socket) -> None:
        try:
            port = original_port(client)
        except OSError as e:
            log.warning("pod %s: port-forward: no original destination: %s", self.pod_id, e)
            reset_socket(client)
            return
        if len(self._relays) > MAX_CONNECTIONS:
            log.warning("pod %s: port-forward to port %d refused: %d connections already",
                        self.pod_id, port, MAX_CONNECTIONS)
            reset_socket(client)
            return
        try:
            guest = await asyncio.wait_for(self._open_guest(port), ANSWER_TIMEOUT_S)
        except (OSError, ValueError) as e:  # TimeoutError is an OSError
            log.info("pod %s: port-forward to guest port %d failed: %s", self.pod_id, port,
                     str(e) or f"no answer in {ANSWER_TIMEOUT_S:g} s")
            reset_socket(client)
            return
        except BaseException:
            reset_socket(client)
            raise
        log.debug("pod %s: port-forward to guest port %d", self.pod_id, port)
        await splice(client, guest)

    async def _open_guest(self, port: int) -> socket.socket:
        """A stream to guest `port` through the agent; ConnectionRefusedError with the agent's
        reason when nothing there accepts, ProtocolError (ValueError) for a broken answer."""
        sock = await self._connect()
        try:
            await asyncio.get_running_loop().sock_sendall(sock, protocol.request(port))
            protocol.check_answer(await read_line(sock, protocol.MAX_LINE))
        except BaseException:
            sock.close()
            raise
        return sock
