"""Stdio relays between real FIFOs and a guest-like listener.

The guest's vsock listener is stood in for by unix sockets named after the port (the real
vsock path is exercised by tests/vm/test_sandboxer*.py); everything else is real: FIFOs opened
the way containerd opens them, the relay tasks, EOF and half-close propagation.
"""

import asyncio
import os

import pytest

from host_sandboxer.taskproxy.stdio import PortAllocator, ProcessStdio


class UnixPortTransport:
    """open_connection(port) to `<dir>/<port>`: the guest listener's stand-in."""

    def __init__(self, directory):
        self.directory = directory

    async def open_connection(self, port):
        return await asyncio.open_unix_connection(os.path.join(self.directory, str(port)))


async def read_fifo(path):
    loop = asyncio.get_running_loop()
    fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
    chunks = []
    while data := await loop.run_in_executor(None, os.read, fd, 65536):
        chunks.append(data)
    os.close(fd)
    return b"".join(chunks)


def test_ports_are_unique_and_resume_from_saved_next():
    ports = PortAllocator()
    io = ProcessStdio("", "/x/out", "/x/err", ports)
    assert io.guest_paths() == {"stdin": "", "stdout": "vsock://2048", "stderr": "vsock://2049"}
    assert PortAllocator(ports.next).take() == 2050


@pytest.mark.timeout(20)
def test_stdout_stdin_round_trip_with_eof(tmp_path):
    async def scenario():
        fifos = {n: str(tmp_path / n) for n in ("stdin", "stdout", "stderr")}
        for path in fifos.values():
            os.mkfifo(path)
        io = ProcessStdio(fifos["stdin"], fifos["stdout"], fifos["stderr"], PortAllocator())
        payload = os.urandom(300_000)
        got_stdin = asyncio.get_running_loop().create_future()

        async def guest_stdin(reader, writer):
            got_stdin.set_result(await reader.read())  # until the host's half-close
            writer.close()

        async def guest_output(data):
            async def handler(reader, writer):
                writer.write(data)
                await writer.drain()
                writer.close()
            return handler

        servers = [
            await asyncio.start_unix_server(guest_stdin, str(tmp_path / str(io.ports["stdin"]))),
            await asyncio.start_unix_server(await guest_output(payload),
                                            str(tmp_path / str(io.ports["stdout"]))),
            await asyncio.start_unix_server(await guest_output(b"err\n"),
                                            str(tmp_path / str(io.ports["stderr"]))),
        ]
        io.start(UnixPortTransport(str(tmp_path)))
        out_task = asyncio.create_task(read_fifo(fifos["stdout"]))
        err_task = asyncio.create_task(read_fifo(fifos["stderr"]))
        stdin_fd = await asyncio.to_thread(os.open, fifos["stdin"], os.O_WRONLY)
        os.write(stdin_fd, b"hello guest")
        os.close(stdin_fd)
        await io.stdin_done(5)
        await io.outputs_done(5)
        assert await got_stdin == b"hello guest"
        assert await out_task == payload
        assert await err_task == b"err\n"
        await io.close()
        for s in servers:
            s.close()

    asyncio.run(scenario())


@pytest.mark.timeout(20)
def test_close_unblocks_fifos_nobody_opened(tmp_path):
    async def scenario():
        out = str(tmp_path / "out")
        os.mkfifo(out)
        io = ProcessStdio("", out, "", PortAllocator())

        async def silent(reader, writer):
            await reader.read()

        server = await asyncio.start_unix_server(silent, str(tmp_path / str(io.ports["stdout"])))
        io.start(UnixPortTransport(str(tmp_path)))
        await asyncio.sleep(0.2)
        await asyncio.wait_for(io.close(), 5)
        server.close()

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_fifos_nobody_opens_yet_do_not_hold_up_other_relays(tmp_path):
    async def scenario():
        async def talk(reader, writer):
            writer.write(b"out")
            await writer.drain()
            writer.close()

        ports = PortAllocator()
        idle = []
        for i in range(12):  # more than the default executor's threads on a small machine
            os.mkfifo(tmp_path / f"idle{i}")
            os.mkfifo(tmp_path / f"in{i}")
            idle.append(ProcessStdio(str(tmp_path / f"in{i}"), str(tmp_path / f"idle{i}"), "", ports))
        os.mkfifo(tmp_path / "live")
        live = ProcessStdio("", str(tmp_path / "live"), "", ports)
        servers = [await asyncio.start_unix_server(talk, str(tmp_path / str(port)))
                   for io in idle + [live] for port in io.ports.values()]
        for io in idle + [live]:
            io.start(UnixPortTransport(str(tmp_path)))
        assert await asyncio.wait_for(read_fifo(str(tmp_path / "live")), 10) == b"out"
        for io in idle + [live]:
            await asyncio.wait_for(io.close(), 5)
        for server in servers:
            server.close()

    asyncio.run(scenario())
