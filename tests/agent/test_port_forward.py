"""Port-forwarding without a VM: the real dev-mode agent (`--port-forward unix://...`) plays the
guest, connecting to 127.0.0.1 of this host; the daemon's PortForwarder listens in a network
namespace of the test's own (NetnsPair) with its real nftables rule, so a client dialling
127.0.0.1:PORT in that namespace reaches a server on this host's loopback only through them.
Misbehaving guests (silent, garbled) are scripted unix servers: the real agent cannot be made
to misbehave."""
from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time

import pytest

from bench.netpair import NetnsPair, sh
from host_sandboxer.network.errors import NetworkError
from host_sandboxer.network.netns import run_in_netns
from host_sandboxer.portforward import PortForwarder, forwarder
from vmm_common import portforward as protocol

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
PAYLOAD = os.urandom(3 << 20) + b"end"  # more than any socket buffer on the way


async def _digest_server():
    """A TCP server on this host's 127.0.0.1: reads to EOF, answers the sha256 of what it got
    and the bytes back reversed, then closes."""
    async def handle(reader, writer):
        data = await reader.read()
        writer.write(hashlib.sha256(data).hexdigest().encode() + b"\n" + data[::-1])
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _exchange(reader, writer, payload: bytes) -> bytes:
    """Send everything and half-close (the transport sends the EOF once the bytes are out),
    read until the other side's EOF."""
    writer.write(payload)
    writer.write_eof()
    received = await reader.read()
    writer.close()
    return received


def _expected(payload: bytes) -> bytes:
    return hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload[::-1]


# -- the guest side alone ---------------------------------------------------------------------


def test_agent_relays_both_ways_with_half_close(agent):
    async def body():
        server, port = await _digest_server()
        async with server:
            reader, writer = await asyncio.open_unix_connection(str(agent.port_forward_socket))
            writer.write(protocol.request(port))
            assert await reader.readline() == protocol.OK
            return await _exchange(reader, writer, PAYLOAD)
    assert asyncio.run(body()) == _expected(PAYLOAD)


def test_agent_refuses_a_port_nobody_listens_on_at_once(agent):
    async def body():
        reader, writer = await asyncio.open_unix_connection(str(agent.port_forward_socket))
        began = time.monotonic()
        writer.write(protocol.request(_free_port()))
        answer = await reader.readline()
        rest = await reader.read()
        writer.close()
        return answer, rest, time.monotonic() - began
    answer, rest, took = asyncio.run(body())
    with pytest.raises(ConnectionRefusedError, match="127.0.0.1: Connection refused"):
        protocol.check_answer(answer)
    assert rest == b"" and took < 2


@pytest.mark.parametrize("request_line", [b"PORT 0\n", b"PORT 65536\n", b"GET / HTTP/1.0\n",
                                          b"PORT 80", b"x" * 70000])
def test_agent_closes_a_bad_request_without_answer_and_serves_on(agent, request_line):
    async def body():
        reader, writer = await asyncio.open_unix_connection(str(agent.port_forward_socket))
        writer.write(request_line)
        if not request_line.endswith(b"\n") and len(request_line) < 1000:
            writer.write_eof()  # a request cut short
        try:
            return await asyncio.wait_for(reader.read(), 15)
        except ConnectionResetError:  # closed with our unread bytes in its buffer
            return b""
        finally:
            writer.close()
    assert asyncio.run(body()) == b""
    test_agent_relays_both_ways_with_half_close(agent)  # the agent still serves
    assert agent.alive()


# -- the host side, through the real agent ----------------------------------------------------


class ForwarderRun:
    """A PortForwarder in the pod namespace of `pair`, `connect` opening the 'guest' stream."""

    def __init__(self, pair: NetnsPair, connect):
        self.pair, self.connect = pair, connect

    async def __aenter__(self) -> PortForwarder:
        self.forwarder = await PortForwarder.open("pftest", self.pair.pod_path, self.connect)
        return self.forwarder

    async def __aexit__(self, *exc) -> None:
        await self.forwarder.close()

    async def dial(self, port: int):
        """A connection to 127.0.0.1:port made from inside the pod namespace."""
        sock = run_in_netns(self.pair.pod_path, socket.socket)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        return await asyncio.open_connection(sock=sock)

    async def exchange(self, port: int, payload: bytes) -> bytes:
        return await _exchange(*await self.dial(port), payload)


def _unix_connect(path):
    """The forwarder's `connect`: a socket to the (dev-mode) guest's port-forward listener."""
    async def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, str(path))
        return sock
    return connect


def test_localhost_in_the_pod_namespace_reaches_the_guest_loopback(agent):
    with NetnsPair() as pair:
        before = pair.snapshot(pair.pod)
        run = ForwarderRun(pair, _unix_connect(agent.port_forward_socket))

        async def body():
            server, port = await _digest_server()
            async with server, run as fwd:
                assert f"table ip {forwarder.redirect.TABLE}" in pair.snapshot(pair.pod)["nft_tables"]
                results = await asyncio.gather(*(run.exchange(port, PAYLOAD[:n])
                                                 for n in (0, 1, 70000, len(PAYLOAD))))
                # the listener's own port is the guest's port of that number too (nothing
                # listens there on this host): no loop, a reset
                with pytest.raises(ConnectionResetError):
                    await run.exchange(fwd.port, b"x")
            return results
        results = asyncio.run(body())
        assert results == [_expected(PAYLOAD[:n]) for n in (0, 1, 70000, len(PAYLOAD))]
        assert pair.snapshot(pair.pod) == before
        # with the rule gone, localhost of the namespace is its own again: nothing listens
        with pytest.raises(ConnectionRefusedError):
            run_in_netns(pair.pod_path, lambda: socket.create_connection(("127.0.0.1", 9), 5))


def test_a_port_nobody_listens_on_resets_the_client_at_once(agent):
    with NetnsPair() as pair:
        run = ForwarderRun(pair, _unix_connect(agent.port_forward_socket))

        async def body():
            async with run:
                reader, writer = await run.dial(_free_port())
                began = time.monotonic()
                with pytest.raises(ConnectionResetError):
                    await reader.read()
                writer.close()
                return time.monotonic() - began
        assert asyncio.run(body()) < 2


async def _scripted_guest(path: str, answer: bytes | None):
    """A 'guest' that reads the request, then answers `answer` and holds the connection open
    (None: answers nothing)."""
    held = []

    async def handle(reader, writer):
        await reader.readline()
        if answer is not None:
            writer.write(answer)
        held.append(writer)
    server = await asyncio.start_unix_server(handle, path)
    return server, held


@pytest.mark.parametrize("answer", [None, b"YES\n", b"OK", b"ERR " + b"x" * 300 + b"\n"])
def test_a_guest_that_does_not_answer_properly_gets_the_client_reset(tmp_path, monkeypatch, answer):
    monkeypatch.setattr(forwarder, "ANSWER_TIMEOUT_S", 1.0)
    path = str(tmp_path / "guest.sock")
    with NetnsPair() as pair:
        before = pair.snapshot(pair.pod)
        run = ForwarderRun(pair, _unix_connect(path))

        async def body():
            server, held = await _scripted_guest(path, answer)
            async with server, run:
                reader, writer = await run.dial(8080)
                began = time.monotonic()
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(reader.read(), 10)
                writer.close()
                for guest in held:
                    guest.close()
                return time.monotonic() - began
        assert asyncio.run(body()) < 5
        assert pair.snapshot(pair.pod) == before


def test_a_guest_flooding_a_client_that_does_not_read_is_held_back(tmp_path):
    """Backpressure end to end: while the client reads nothing, the relay stops reading the
    guest once its buffers are full, so what the guest got written stays a few MiB (socket
    buffers on both sides plus the relay's bounded buffers); then everything arrives in order."""
    path = str(tmp_path / "guest.sock")
    flood = bytes(range(256)) * (32 << 12)  # 32 MiB
    with NetnsPair() as pair:
        run = ForwarderRun(pair, _unix_connect(path))

        async def body():
            written = []

            async def guest(reader, writer):
                await reader.readline()
                writer.write(protocol.OK)
                for offset in range(0, len(flood), 1 << 16):
                    writer.write(flood[offset:offset + (1 << 16)])
                    await writer.drain()
                    written.append(offset + (1 << 16))
                writer.close()
            server = await asyncio.start_unix_server(guest, path)
            async with server, run:
                reader, writer = await run.dial(8080)
                await asyncio.sleep(2)  # the client reads nothing meanwhile
                held_at = written[-1]
                received = await asyncio.wait_for(reader.read(), 60)
                writer.close()
            return held_at, received
        held_at, received = asyncio.run(body())
        assert held_at < 8 << 20, f"the guest got {held_at} bytes written to a client that reads nothing"
        assert received == flood


def test_open_fails_naming_the_namespace_and_leaves_nothing(tmp_path, monkeypatch):
    with NetnsPair() as pair:
        before, fds = pair.snapshot(pair.pod), sorted(os.listdir("/proc/self/fd"))
        monkeypatch.setattr(forwarder.redirect, "_SEARCH_PATH", str(tmp_path))  # no nft there
        with pytest.raises(NetworkError, match=f"^network namespace {pair.pod_path}: "
                                                          "port-forwarding: nft not found"):
            asyncio.run(PortForwarder.open("pftest", pair.pod_path, None))
        assert pair.snapshot(pair.pod) == before
        assert sorted(os.listdir("/proc/self/fd")) == fds  # the listener is closed

    with pytest.raises(NetworkError, match="^network namespace /var/run/netns/vmmt-absent "
                                                      "does not exist$"):
        asyncio.run(PortForwarder.open("pftest", "/var/run/netns/vmmt-absent", None))
