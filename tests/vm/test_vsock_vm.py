"""Whole-VM tests of the hybrid vsock backend: a real QEMU 7.2 (TCG) and Linux guest driver.

The guest is the test-only echo guest (vsock_echo_guest.py): the project kernel and a static C
/init serving echo/source/sink ports, booted by the real launcher. The agent's own vsock use
is covered by the other VM tests; these push the transport itself.
"""

import asyncio
import hashlib
import os
import signal
import time

import pytest

from vsock_echo_guest import (BLOCK, ECHO, HOST_ECHO_PORT, SINK, SOURCE_PORT, expected_block, make_vm,
                              remove_run_dir, short_run_dir)

pytestmark = pytest.mark.vm
MiB = 1 << 20


def with_vms(count: int):
    """Runs the async test with `count` booted echo guests; tears them down whatever happens."""
    def decorate(test):
        def wrapper():
            async def scenario():
                dirs = [short_run_dir() for _ in range(count)]
                vms = [make_vm(d, name=f"vsock-echo-{i}") for i, d in enumerate(dirs)]
                try:
                    for vm in vms:
                        await vm.start()
                    await test(*vms)
                finally:
                    for vm in vms:
                        await vm.close()
                    for d in dirs:
                        remove_run_dir(d)
            asyncio.run(scenario())
        wrapper.__name__, wrapper.__doc__ = test.__name__, test.__doc__   # no fixtures: the VMs are args
        return wrapper
    return decorate


async def echo_round(vm, payload: bytes) -> bytes:
    reader, writer = await vm.open_connection(ECHO)

    async def send():
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
    sender = asyncio.ensure_future(send())
    echoed = await reader.read()
    await sender
    writer.close()
    return echoed


@with_vms(1)
async def test_ten_connections_at_once(vm):
    payloads = [os.urandom(MiB + i * 4099) for i in range(10)]
    echoed = await asyncio.wait_for(asyncio.gather(*(echo_round(vm, p) for p in payloads)), 120)
    for sent, got in zip(payloads, echoed):
        assert hashlib.sha256(got).digest() == hashlib.sha256(sent).digest()
    assert not vm.transport.device.conns


@with_vms(1)
async def test_64_mib_each_way_intact(vm):
    size = 64 * MiB
    # host -> guest -> host: every byte crosses both ways; sha256 of what came back.
    payload = os.urandom(size)
    echoed = await asyncio.wait_for(echo_round(vm, payload), 300)
    assert len(echoed) == size and hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    # guest -> host alone: the guest generates, we check against the known pattern.
    reader, writer = await vm.open_connection(SOURCE_PORT)
    writer.write(size.to_bytes(8, "little"))
    got = await asyncio.wait_for(reader.read(), 300)
    writer.close()
    assert hashlib.sha256(got).digest() == hashlib.sha256(expected_block() * (size // BLOCK)).digest()
    # host -> guest alone: the guest counts what arrived.
    reader, writer = await vm.open_connection(SINK)
    writer.write(payload)
    writer.write_eof()
    assert int.from_bytes(await asyncio.wait_for(reader.readexactly(8), 300), "little") == size
    writer.close()


@with_vms(1)
async def test_guest_connects_out_and_is_refused_where_nothing_listens(vm):
    accepted = asyncio.get_running_loop().create_future()
    server = await asyncio.start_unix_server(lambda r, w: accepted.set_result((r, w)),
                                             f"{vm.transport.uds_path}_{HOST_ECHO_PORT}")
    reader, writer = await asyncio.wait_for(accepted, 30)
    writer.write(b"to the guest and back\n")
    assert await asyncio.wait_for(reader.readline(), 10) == b"to the guest and back\n"
    console = vm.console.log_path.read_text()
    assert "host port 6001 refused" in console and "connected to host port 6000" in console
    writer.close()
    server.close()


@with_vms(2)
async def test_killing_qemu_mid_stream_leaves_the_backend_healthy(victim, bystander):
    reader, writer = await victim.open_connection(ECHO)
    received = 0

    async def send():
        chunk = os.urandom(MiB)
        for _ in range(256):
            writer.write(chunk)
            await writer.drain()

    async def receive():
        nonlocal received
        while True:
            data = await reader.read(MiB)
            if not data:
                raise ConnectionResetError("the stream ended without its data")
            received += len(data)
    streaming = asyncio.gather(send(), receive())
    while received < 4 * MiB:
        await asyncio.sleep(0.01)
    os.kill(victim.qemu.proc.pid, signal.SIGKILL)
    started = time.monotonic()
    reason = await asyncio.wait_for(victim.transport.dead, 10)
    assert "closed" in reason
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError, OSError)):
        await asyncio.wait_for(streaming, 10)
    assert time.monotonic() - started < 10
    assert not victim.transport.device.conns
    # The other VM on the same loop is untouched.
    payload = os.urandom(4 * MiB)
    assert await asyncio.wait_for(echo_round(bystander, payload), 60) == payload
    # And the victim's socket refuses cleanly instead of hanging.
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(victim.open_connection(ECHO), 10)
