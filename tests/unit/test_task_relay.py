"""The task relay (host_sandboxer/taskrelay/): the real relay process, driven by the daemon's side
(TaskRelay) in this process, with ttrpc services standing in for a pod's Task API (the real one
needs a VM: tests/vm/test_sandboxer_restart.py). containerd is played by ttrpc clients and by
raw sockets writing frames by hand (for what a well-behaved client never sends).

A "daemon" here is a TaskRelay and its services: closing it is what a killed daemon's exit does
to the relay (its control connection closes); a second one resumes as a restarted daemon.
"""
import asyncio
import os
import resource
import signal
import socket
import time

import pytest

from google.protobuf import wrappers_pb2

from host_sandboxer.taskrelay import conn as relay_conn, control as relay_session, wire
from host_sandboxer.taskrelay.relay import Relay
from host_sandboxer.taskrelay.link import RESUMED_METADATA, TaskRelay, _Link, _RelayedChannel
from host_sandboxer.vmm import process
from vmm_common import ttrpc
from vmm_common.protos.containerd.task.v3 import shim_pb2 as v3
from vmm_common.protos.ttrpc.request_pb2 import Request, Response
from vmm_common.ttrpc import frame as fr

SERVICE = "containerd.task.v3.Task"
POD = "pod1"


class Daemon:
    """A stand-in daemon: its Task API's State answers at once (pid = `tag`), its Wait when
    `release` is set (exit status = `tag`); what it saw is recorded."""

    def __init__(self, tmp_path, tag: int, state_bytes: int = 0, state_delay: float = 0.0):
        self.tag = tag
        self.streamed: list[tuple[bool, bytes]] = []  # (resumed?, message) as Echo got them
        self.release = asyncio.Event()
        self.waits_cancelled = 0
        self.state_bytes = state_bytes
        self.state_delay = state_delay
        server = ttrpc.Server()
        server.register(SERVICE, {"State": ttrpc.unary(v3.StateRequest, self._state),
                                  "Wait": ttrpc.unary(v3.WaitRequest, self._wait),
                                  "Echo": ttrpc.bidi_stream(wrappers_pb2.BytesValue, self._echo)})
        self.relay = TaskRelay(tmp_path, lambda pod: server if pod == POD else None)

    async def _state(self, request, ctx):
        await asyncio.sleep(self.state_delay)
        return v3.StateResponse(id=request.id, pid=self.tag, bundle="x" * self.state_bytes)

    async def _echo(self, stream, ctx):
        """A streaming call shaped like containerd's Streaming/Stream: the first message is
        answered at once (unless the call is RESUMED), later ones are recorded; b"tag" is
        answered with the daemon's tag."""
        resumed = ctx.get(RESUMED_METADATA) is not None
        first = True
        async for message in stream:
            self.streamed.append((resumed, message.value[:16]))
            if (first and not resumed) or message.value == b"tag":
                await stream.send(wrappers_pb2.BytesValue(value=b"%d" % self.tag))
            first = False

    async def _wait(self, request, ctx):
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.waits_cancelled += 1
            raise
        return v3.WaitResponse(exit_status=self.tag)


async def _serving(tmp_path, tag: int, **kwargs) -> Daemon:
    """A daemon whose relay serves POD's task address."""
    daemon = Daemon(tmp_path, tag, **kwargs)
    await daemon.relay.listen(POD, _address(tmp_path))
    return daemon


def _run(tmp_path, scenario):
    """asyncio.run(scenario()); whatever the test leaves, the relay process does not outlive it."""
    try:
        return asyncio.run(scenario())
    finally:
        process.kill_strays(tmp_path)


def _address(tmp_path):
    (tmp_path / POD).mkdir(exist_ok=True)
    return tmp_path / POD / "task.sock"


async def _client(tmp_path):
    return await ttrpc.Client.connect_unix(str(_address(tmp_path)))


async def _state(client, cid="c", timeout=10):
    return await client.call(SERVICE, "State", v3.StateRequest(id=cid), v3.StateResponse, timeout=timeout)


def _wait(client, cid="c"):
    return asyncio.ensure_future(client.call(SERVICE, "Wait", v3.WaitRequest(id=cid), v3.WaitResponse))


def _raw_request(stream_id: int, method: str = "State", payload: bytes = b"") -> bytes:
    request = Request(service=SERVICE, method=method, payload=payload or v3.StateRequest(id="c").SerializeToString())
    return fr.encode(stream_id, fr.REQUEST, 0, request.SerializeToString())


def _read_responses(sock: socket.socket, count: int, timeout: float = 10.0) -> list[Response]:
    """`count` ttrpc responses from a raw connection (fewer if it closes first)."""
    sock.settimeout(timeout)
    buffer, found = bytearray(), []
    while len(found) < count:
        data = sock.recv(1 << 20)
        if not data:
            break
        buffer += data
        found += [Response.FromString(frame[fr.HEADER_SIZE:])
                  for _, _, _, frame in wire.take(buffer, wire.TTRPC_MAX_DATA)]
    return found


def _closed(sock: socket.socket, timeout: float = 10.0) -> bool:
    """Whether the peer closes `sock` (whatever it sent first is skipped)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        pass
    return True


def test_calls_pass_and_a_held_wait_is_answered_by_the_next_daemon(tmp_path):
    async def scenario():
        first = await _serving(tmp_path, 1)
        assert oct(_address(tmp_path).stat().st_mode & 0o777) == "0o600"
        assert oct((tmp_path / "task-relay.sock").stat().st_mode & 0o777) == "0o600"
        client = await _client(tmp_path)
        assert (await _state(client)).pid == 1
        held = _wait(client)
        await asyncio.sleep(0.2)
        relay_pid = first.relay.helper.proc.pid
        await first.relay.close()  # the daemon is gone; its handlers with it
        await asyncio.sleep(0.2)
        assert first.waits_cancelled == 1 and not held.done()
        during = asyncio.ensure_future(_state(client, "while-down", timeout=None))  # asked of nobody
        await asyncio.sleep(0.2)
        assert not during.done()

        second = Daemon(tmp_path, 2)
        await second.relay.resume({POD: _address(tmp_path)})
        assert second.relay.helper.proc.pid == relay_pid  # adopted, not started anew
        answer = await asyncio.wait_for(during, 10)
        assert (answer.id, answer.pid) == ("while-down", 2)
        assert not held.done()
        second.release.set()
        assert (await asyncio.wait_for(held, 10)).exit_status == 2
        assert (await _state(client)).pid == 2  # the same connection, live again
        await client.close()
        await second.relay.unlisten(POD)  # the last pod: the relay ends
        return second.relay.helper.proc.returncode

    assert _run(tmp_path, scenario) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == [POD]  # no record, control socket or log left


def test_a_stream_goes_on_with_the_next_daemon_without_keeping_its_data(tmp_path):
    """A streaming call (containerd's Streaming/Stream for `io_type = "streaming"`) outlives
    daemons: more than MAX_KEPT_BYTES may flow (its data is not kept once a daemon has it),
    the next daemon gets the call RESUMED with its first message (it does not ack it again)
    and what was sent while no daemon ran, and nothing the previous daemon already had."""
    async def scenario():
        first = await _serving(tmp_path, 21)
        client = await _client(tmp_path)
        stream = await client.stream(SERVICE, "Echo", wrappers_pb2.BytesValue,
                                     streaming_client=True, streaming_server=True)
        await stream.send(wrappers_pb2.BytesValue(value=b"init"))
        assert (await asyncio.wait_for(stream.recv(), 10)).value == b"21"
        bulk = b"x" * (1 << 20)
        for _ in range(relay_conn.MAX_KEPT_BYTES // len(bulk) + 2):
            await stream.send(wrappers_pb2.BytesValue(value=bulk))
        await stream.send(wrappers_pb2.BytesValue(value=b"tag"))
        assert (await asyncio.wait_for(stream.recv(), 10)).value == b"21"  # all passed, connection kept
        await first.relay.close()
        await stream.send(wrappers_pb2.BytesValue(value=b"while down"))
        await asyncio.sleep(0.2)

        second = Daemon(tmp_path, 22)
        await second.relay.resume({POD: _address(tmp_path)})
        await stream.send(wrappers_pb2.BytesValue(value=b"tag"))
        assert (await asyncio.wait_for(stream.recv(), 10)).value == b"22"  # no second ack before it
        assert second.streamed == [(True, b"init"), (True, b"while down"), (True, b"tag")]
        await stream.close_send()
        assert await asyncio.wait_for(stream.recv(), 10) is None
        await client.close()
        await second.relay.unlisten(POD)

    _run(tmp_path, scenario)


def test_a_frame_counts_as_sent_once_the_relay_has_it(tmp_path):
    """A relayed frame's send returns only when the frame is in the relay's socket, not queued
    in the daemon (a stream's delivered mark advances on it: a daemon killed after that loses
    nothing the mark counts). The relay's end of the link is a socketpair read by hand here."""
    async def scenario():
        ours, relays = socket.socketpair()
        ours.setblocking(False)  # as the daemon's connection to the relay is
        link = _Link(ours, lambda pod: None)
        link.synced.set_result(None)  # no relay here to say so
        send = asyncio.ensure_future(_RelayedChannel(link, 1).send(1, fr.DATA, 0, b"x" * (2 << 20)))
        await asyncio.sleep(0.3)
        assert not send.done() and link.outbox.size > 0  # more than the socket holds
        got = 0
        relays.setblocking(False)
        while not send.done():
            try:
                got += len(relays.recv(1 << 20))
            except BlockingIOError:
                await asyncio.sleep(0.01)
        await send
        assert got + len(relays.recv(1 << 20)) > 2 << 20
        await link.close()
        relays.close()

    _run(tmp_path, scenario)


def test_a_leaving_daemon_answers_the_calls_under_way_but_not_the_held_ones(tmp_path):
    """SIGTERM (an upgrade): a call under way is answered by the daemon that began it (not cut
    halfway and run again); a held Wait, and a call made meanwhile, go to the next daemon."""
    async def scenario():
        first = await _serving(tmp_path, 12, state_delay=1.0)
        client = await _client(tmp_path)
        held = _wait(client)
        under_way = asyncio.ensure_future(_state(client, "under-way"))
        await asyncio.sleep(0.3)
        leaving = asyncio.ensure_future(first.relay.close(frozenset({"Wait"}), 10.0))
        await asyncio.sleep(0.1)
        meanwhile = asyncio.ensure_future(_state(client, "meanwhile", timeout=None))
        assert (await asyncio.wait_for(under_way, 5)).pid == 12
        await asyncio.wait_for(leaving, 5)
        assert not held.done() and not meanwhile.done()
        second = Daemon(tmp_path, 13)
        await second.relay.resume({POD: _address(tmp_path)})
        assert (await asyncio.wait_for(meanwhile, 10)).pid == 13
        second.release.set()
        assert (await asyncio.wait_for(held, 10)).exit_status == 13
        await client.close()
        await second.relay.unlisten(POD)

    _run(tmp_path, scenario)


def test_containerd_closing_a_connection_ends_its_calls_only(tmp_path):
    async def scenario():
        daemon = await _serving(tmp_path, 3)
        leaving, staying = await _client(tmp_path), await _client(tmp_path)
        _wait(leaving)
        held = _wait(staying)
        await asyncio.sleep(0.2)
        await leaving.close()
        await asyncio.sleep(0.3)
        assert daemon.waits_cancelled == 1
        daemon.release.set()
        assert (await asyncio.wait_for(held, 10)).exit_status == 3
        await staying.close()
        await daemon.relay.unlisten(POD)

    _run(tmp_path, scenario)


@pytest.mark.parametrize("garbage", [
    wire.HEADER.pack(0, 1, 0x09, 0),                     # no such message type
    wire.HEADER.pack(0, 2, fr.REQUEST, 0),               # a client's stream id is odd
    wire.HEADER.pack(0, 1, fr.RESPONSE, 0),              # a client does not answer
    wire.HEADER.pack(5 << 20, 1, fr.REQUEST, 0) + b"x",  # over ttrpc's 4 MiB: refused unread
], ids=["type", "even-stream", "response", "oversized"])
def test_a_garbage_frame_closes_only_its_connection(tmp_path, garbage):
    async def scenario():
        daemon = await _serving(tmp_path, 4)
        good = await _client(tmp_path)
        bad = socket.socket(socket.AF_UNIX)
        bad.connect(str(_address(tmp_path)))
        bad.sendall(garbage)
        assert await asyncio.to_thread(_closed, bad)
        assert (await _state(good)).pid == 4
        await good.close()
        await daemon.relay.unlisten(POD)

    _run(tmp_path, scenario)


def test_unanswered_calls_are_bounded_per_connection(tmp_path):
    """No daemon: calls are kept up to MAX_KEPT_CALLS (and MAX_KEPT_BYTES); the next one is
    refused by the relay itself, the connection stays; a new daemon answers the kept ones."""
    async def scenario():
        first = await _serving(tmp_path, 5)
        await first.relay.close()
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(str(_address(tmp_path)))
        limit = relay_conn.MAX_KEPT_CALLS
        raw.sendall(b"".join(_raw_request(2 * i + 1) for i in range(limit + 1)))
        refused = await asyncio.to_thread(_read_responses, raw, 1)
        assert refused[0].status.code == ttrpc.Code.RESOURCE_EXHAUSTED
        assert f"{limit} calls" in refused[0].status.message

        bulky = socket.socket(socket.AF_UNIX)  # the byte bound, on a connection of its own
        bulky.connect(str(_address(tmp_path)))
        payload = v3.StateRequest(id="c", exec_id="x" * (3 << 20)).SerializeToString()
        bulky.sendall(b"".join(_raw_request(2 * i + 1, payload=payload) for i in range(3)))
        refused = await asyncio.to_thread(_read_responses, bulky, 1)
        assert refused[0].status.code == ttrpc.Code.RESOURCE_EXHAUSTED

        second = Daemon(tmp_path, 6)
        await second.relay.resume({POD: _address(tmp_path)})
        answered = await asyncio.to_thread(_read_responses, raw, limit)
        assert len(answered) == limit and {a.status.code for a in answered} == {0}
        assert [a.status.code for a in await asyncio.to_thread(_read_responses, bulky, 2)] == [0, 0]
        raw.close()
        bulky.close()
        await second.relay.unlisten(POD)

    _run(tmp_path, scenario)


def test_a_peer_that_does_not_read_its_answers_is_dropped(tmp_path):
    async def scenario():
        daemon = await _serving(tmp_path, 7, state_bytes=3 << 20)
        stuck = socket.socket(socket.AF_UNIX)
        stuck.connect(str(_address(tmp_path)))
        stuck.sendall(b"".join(_raw_request(2 * i + 1) for i in range(8)))  # 24 MiB of answers
        await asyncio.sleep(3)  # never read meanwhile
        got = await asyncio.to_thread(_read_responses, stuck, 8)
        assert len(got) < 8, "the relay buffered every answer for a peer that did not read"
        good = await _client(tmp_path)
        assert (await _state(good)).pid == 7
        await good.close()
        await daemon.relay.unlisten(POD)

    _run(tmp_path, scenario)


def test_sighup_re_executes_the_relay_keeping_every_connection(tmp_path):
    async def scenario():
        daemon = await _serving(tmp_path, 8)
        client = await _client(tmp_path)
        held = _wait(client)
        await asyncio.sleep(0.2)
        pid = daemon.relay.helper.proc.pid
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "re-executed" not in daemon.relay.helper.output.tail() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert "re-executed: 1 listener(s), 1 connection(s) kept" in daemon.relay.helper.output.tail()
        assert daemon.relay.helper.alive() and process.start_time(pid) is not None
        assert (await _state(client)).pid == 8  # the same connection, the same daemon link
        daemon.release.set()
        assert (await asyncio.wait_for(held, 10)).exit_status == 8
        fresh = await _client(tmp_path)  # the listener came along too
        assert (await _state(fresh)).pid == 8
        for c in (client, fresh):
            await c.close()
        await daemon.relay.unlisten(POD)

    _run(tmp_path, scenario)


def test_a_dead_relay_is_replaced_and_serves_the_pods_again(tmp_path):
    """containerd sees its connections close (what a crash costs); new ones are served."""
    async def scenario():
        daemon = await _serving(tmp_path, 9)
        client = await _client(tmp_path)
        old = daemon.relay.helper.proc.pid
        os.kill(old, signal.SIGKILL)
        with pytest.raises(ttrpc.RpcError) as lost:
            await _state(client)
        assert lost.value.code == ttrpc.Code.UNAVAILABLE
        # The old connection can end before the dying relay's listener does: a connection
        # made in between is queued there and reset with it (part of what the crash costs).
        # "New ones" are those made once the daemon has seen the death and started another.
        deadline = time.monotonic() + 10
        while getattr(daemon.relay.helper.proc, "pid", old) == old:  # None while it spawns
            assert time.monotonic() < deadline, "the dead relay was not replaced"
            await asyncio.sleep(0.05)
        while True:  # refused until the daemon has made the pod's new listener
            try:
                fresh = await _client(tmp_path)
                break
            except (ConnectionRefusedError, FileNotFoundError):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        assert (await _state(fresh)).pid == 9
        await fresh.close()
        await client.close()
        await daemon.relay.unlisten(POD)

    _run(tmp_path, scenario)


def test_a_connection_to_a_pod_the_daemon_does_not_know_is_closed(tmp_path):
    async def scenario():
        daemon = Daemon(tmp_path, 10)
        (tmp_path / "gone").mkdir()
        await daemon.relay.listen("gone", tmp_path / "gone" / "task.sock")  # the services know only POD
        client = await ttrpc.Client.connect_unix(str(tmp_path / "gone" / "task.sock"))
        with pytest.raises(ttrpc.RpcError) as closed:
            await _state(client)
        assert closed.value.code == ttrpc.Code.UNAVAILABLE
        await client.close()
        await daemon.relay.unlisten("gone")

    _run(tmp_path, scenario)


def test_the_relay_takes_the_hard_fd_limit(tmp_path):
    """One fd per containerd connection: a node's containers must not meet a soft limit of 1024."""
    async def scenario():
        daemon = await _serving(tmp_path, 14)  # started with this process's limits
        limits = open(f"/proc/{daemon.relay.helper.proc.pid}/limits").read()
        await daemon.relay.unlisten(POD)
        return next(line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files"))

    ours = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, ours[1]), ours[1]))
    try:
        soft, hard = _run(tmp_path, scenario)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, ours)
    assert int(soft) == int(hard) == ours[1]


def test_the_relay_process_is_lean(tmp_path):
    """stdlib and host_sandboxer.taskrelay only: no site-packages, asyncio, ssl or protobuf."""
    async def scenario():
        daemon = await _serving(tmp_path, 11)
        pid = daemon.relay.helper.proc.pid
        facts = open(f"/proc/{pid}/cmdline").read().split("\0"), open(f"/proc/{pid}/maps").read()
        await daemon.relay.unlisten(POD)
        return facts

    argv, maps = _run(tmp_path, scenario)
    assert "-S" in argv and "-I" in argv and "/python3" in maps
    for library in ("_asyncio.", "libssl", "_ssl.", "_message.", "_upb"):
        assert library not in maps


def test_the_relays_own_answer_is_a_ttrpc_status():
    frame = wire.error_response(7, ttrpc.Code.RESOURCE_EXHAUSTED, "é" * 600)
    length, stream_id, msg_type, _ = fr.decode_header(frame[:fr.HEADER_SIZE])
    response = Response.FromString(frame[fr.HEADER_SIZE:])
    assert (length, stream_id, msg_type) == (len(frame) - fr.HEADER_SIZE, 7, fr.RESPONSE)
    assert response.status.code == ttrpc.Code.RESOURCE_EXHAUSTED
    assert response.status.message.startswith("é")  # cut at 1 KiB, never inside a character


class _QuietLoop:
    """The relay loop's interface, doing nothing: the test drives the connection by hand."""

    def add_reader(self, fd, *args):
        pass

    remove_reader = add_writer = remove_writer = add_reader


class _Recorder:
    """The Relay as a Conn sees it: records what it forwards and why the connection ended."""

    def __init__(self):
        self.loop, self.session = _QuietLoop(), object()
        self.forwarded, self.dropped = [], []

    def received(self, conn, frame):
        self.forwarded.append(wire.ttrpc_header(frame))

    def drop(self, conn, reason):
        self.dropped.append(reason)
        conn.close()


def test_what_containerd_sent_before_closing_is_taken_when_an_answer_fails():
    """containerd ends a stdin stream with its last Data and CloseSend and closes the connection
    at once, while a window update may be on its way to it: that write fails (EPIPE), and what
    containerd sent is still forwarded, its CloseSend included, before the connection goes."""
    ours, theirs = socket.socketpair()
    relay = _Recorder()
    conn = relay_conn.Conn(relay, 1, POD, ours)
    stream = Request(service="containerd.services.streaming.v1.Streaming", method="Stream")
    theirs.sendall(fr.encode(1, fr.REQUEST, fr.FLAG_REMOTE_OPEN, stream.SerializeToString())
                   + fr.encode(1, fr.DATA, 0, b"init") + fr.encode(1, fr.DATA, 0, b"last bytes")
                   + fr.encode(1, fr.DATA, fr.FLAG_REMOTE_CLOSED | fr.FLAG_NO_DATA))
    theirs.close()
    conn.send(fr.encode(1, fr.DATA, 0, b"a window update"))
    assert relay.forwarded == [(1, fr.REQUEST, fr.FLAG_REMOTE_OPEN), (1, fr.DATA, 0), (1, fr.DATA, 0),
                               (1, fr.DATA, fr.FLAG_REMOTE_CLOSED | fr.FLAG_NO_DATA)]
    assert len(relay.dropped) == 1 and "write failed" in relay.dropped[0]


class _SessionRecorder(_Recorder):
    """The Relay as a daemon's Session sees it: records the SENDs it forwards."""

    def send(self, conn, frame):
        self.forwarded.append((conn, frame))

    def end_session(self, session, reason):
        self.dropped.append(reason)
        session.close()


def test_what_a_killed_daemon_sent_is_forwarded_when_a_write_to_it_fails():
    """A daemon killed right after its last SEND (a container's output it counted as delivered)
    while containerd's next frame is forwarded to it: that write fails (EPIPE), and the SEND
    still goes to containerd before the session ends."""
    ours, theirs = socket.socketpair()
    relay = _SessionRecorder()
    session = relay_session.Session(relay, ours)
    output = fr.encode(1, fr.DATA, 0, b"6\n")
    theirs.sendall(wire.message(wire.SEND, 7, output) + output)
    theirs.close()
    session.send(wire.RECEIVED, 7, fr.encode(1, fr.DATA, 0, b"a window update"))
    assert relay.forwarded == [(7, output)]
    assert len(relay.dropped) == 1 and "write failed" in relay.dropped[0]


def test_a_new_daemon_takes_over_after_what_the_old_one_sent_is_forwarded():
    """The relay may see a restarted daemon connect before the end of the killed one: the old
    session's last SENDs are forwarded before it is replaced."""
    relay = Relay(_QuietLoop())
    forwarded = []
    relay.send = lambda conn, frame: forwarded.append((conn, frame))
    old, old_daemon = socket.socketpair()
    new, new_daemon = socket.socketpair()
    relay.start_session(old)
    last = fr.encode(1, fr.DATA, 0, b"last line\n")
    old_daemon.sendall(wire.message(wire.SEND, 3, last) + last)
    old_daemon.close()
    relay.start_session(new)
    assert forwarded == [(3, last)]
    assert relay.session is not None and relay.session.sock is new
    relay.close_all()
    new_daemon.close()
