"""Only the host may use the agent's vsock listeners (port 1024, the stdio ports, port-forward).

This host has no vsock loopback, so no real non-host vsock peer can connect here: the peer
check is fed stand-in sockets with a vsock peer address, and the listeners' wiring is exercised
on unix sockets with the check made to refuse the first connection. tests/vm/test_guest_peers.py
connects from inside a real guest.
"""

import asyncio
import socket

import pytest

from vmm_common import ttrpc
from vmm_task import peers
from vmm_task.container.endpoints import parse_endpoint


class VsockPeer:
    """A stand-in for an accepted AF_VSOCK socket whose peer is (cid, port)."""

    family = socket.AF_VSOCK

    def __init__(self, cid: int, port: int = 51234):
        self.address = (cid, port)
        self.closed = False

    def getpeername(self):
        return self.address

    def close(self):
        self.closed = True


def test_only_the_host_cid_is_admitted_on_vsock(caplog):
    assert peers.refusal(VsockPeer(socket.VMADDR_CID_HOST)) == ""
    for cid in (1, 3, 42, socket.VMADDR_CID_ANY):  # loopback, the guest's own cid, another VM
        assert f"vsock peer cid {cid} port 51234 is not the host" in peers.refusal(VsockPeer(cid))
    intruder = VsockPeer(3)
    with caplog.at_level("WARNING"):
        assert not peers.admitted(intruder, "vsock://2048?ack")
    assert intruder.closed
    assert "vsock://2048?ack: connection refused: vsock peer cid 3" in caplog.text


def test_unix_sockets_are_not_checked():
    left, right = socket.socketpair()
    with left, right:
        assert peers.refusal(left) == ""


def refusing_first(monkeypatch) -> list:
    """Make the peer check refuse the first connection it sees (as a container's would be)."""
    seen = []

    def refusal(conn):
        seen.append(conn)
        return "not the host" if len(seen) == 1 else ""
    monkeypatch.setattr(peers, "refusal", refusal)
    return seen


@pytest.mark.timeout(20)
def test_a_refused_peer_does_not_use_up_a_stdio_listener(monkeypatch, tmp_path):
    seen = refusing_first(monkeypatch)
    path = str(tmp_path / "out.sock")

    async def scenario():
        endpoint = parse_endpoint("stdout", f"unix://{path}")  # plain: one connection, then closed
        accepting = asyncio.ensure_future(endpoint.open_writer())
        intruder_reader, _ = await asyncio.open_unix_connection(path)
        assert await asyncio.wait_for(intruder_reader.read(), 5) == b""  # closed at once
        assert not accepting.done()
        _, host_writer = await asyncio.open_unix_connection(path)
        fd = await asyncio.wait_for(accepting, 5)
        host_writer.close()
        return fd

    fd = asyncio.run(scenario())
    socket.socket(fileno=fd).close()
    assert len(seen) == 2


@pytest.mark.timeout(20)
def test_the_ttrpc_server_serves_only_admitted_connections(monkeypatch, tmp_path):
    seen = refusing_first(monkeypatch)
    path = str(tmp_path / "agent.sock")

    async def scenario():
        from google.protobuf import empty_pb2
        from vmm_task.server import listen
        async def ping(request, context):
            return empty_pb2.Empty()
        server = ttrpc.Server()
        server.register("t.S", {"Ping": ttrpc.unary(empty_pb2.Empty, ping)})
        serving = asyncio.ensure_future(server.serve(listen(f"unix://{path}"),
                                                     lambda conn: peers.admitted(conn, "agent")))
        try:
            refused = await ttrpc.Client.connect_unix(path)
            with pytest.raises((ttrpc.RpcError, ConnectionError)):
                await refused.call("t.S", "Ping", empty_pb2.Empty(), empty_pb2.Empty, timeout=5)
            await refused.close()
            served = await ttrpc.Client.connect_unix(path)
            await served.call("t.S", "Ping", empty_pb2.Empty(), empty_pb2.Empty, timeout=5)
            await served.close()
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)

    asyncio.run(scenario())
    assert len(seen) == 2


@pytest.mark.timeout(20)
def test_a_refused_peer_gets_no_port_forward(monkeypatch, tmp_path):
    """Refused: closed unanswered (no port of the guest is dialled for it); the host's next
    connection is served."""
    from vmm_common import portforward as protocol
    from vmm_task import portforward
    from vmm_task.server import listen
    seen = refusing_first(monkeypatch)
    path = str(tmp_path / "port-forward.sock")
    with socket.socket() as bound:  # a port nobody listens on: the served request gets ERR
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]

    async def scenario():
        serving = asyncio.ensure_future(portforward.serve(listen(f"unix://{path}")))
        try:
            answers = []
            for _ in range(2):
                reader, writer = await asyncio.open_unix_connection(path)
                try:
                    writer.write(protocol.request(port))
                    answers.append(await asyncio.wait_for(reader.read(), 5))
                except (BrokenPipeError, ConnectionResetError):  # closed before the request
                    answers.append(b"")
                writer.close()
            return answers
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)

    refused, served = asyncio.run(scenario())
    assert refused == b""
    assert served.startswith(b"ERR port %d: 127.0.0.1: Connection refused" % port)
    assert len(seen) == 2
