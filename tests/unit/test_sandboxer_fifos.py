"""containerd's stdio paths are used only if they are FIFOs: Create/Exec refuse anything else
(INVALID_ARGUMENT naming the stream and what the path is), and a relay that opens a path swapped
for a file since then writes nothing into it. Real files, FIFOs and devices; the guest's side
is the agent's own stream pumps on unix sockets (as in test_sandboxer_stdio.py)."""

import asyncio
import os

import grpc
import pytest

from host_sandboxer.taskproxy.errors import HostError
from host_sandboxer.taskproxy.stdio import PortAllocator, ProcessStdio
from host_sandboxer.vmm.process import kill_strays
from test_sandboxer_stdio import Guest, UnixPortTransport


@pytest.fixture(autouse=True)
def no_keeper_left(tmp_path):
    yield
    kill_strays(tmp_path)


def refused(tmp_path, **stdio) -> str:
    with pytest.raises(HostError) as info:
        ProcessStdio.create(stdio.get("stdin", ""), stdio.get("stdout", ""), stdio.get("stderr", ""),
                            PortAllocator(), tmp_path / "marks")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return info.value.message


def test_create_refuses_stdio_paths_that_are_not_fifos(tmp_path):
    secret = tmp_path / "shadow"
    secret.write_text("root:x:0:0\n")
    (tmp_path / "link").symlink_to(secret)
    (tmp_path / "dir").mkdir()
    assert refused(tmp_path, stdout=str(secret)) == f"stdout {str(secret)!r}: a regular file, not a FIFO"
    assert refused(tmp_path, stderr=str(tmp_path / "link")).endswith("a regular file, not a FIFO")
    assert refused(tmp_path, stdin="/dev/zero") == "stdin '/dev/zero': a character device, not a FIFO"
    assert refused(tmp_path, stdout=str(tmp_path / "dir")).endswith("a directory, not a FIFO")
    assert refused(tmp_path, stdout=str(tmp_path / "none")).endswith("No such file or directory")
    assert secret.read_text() == "root:x:0:0\n"


@pytest.mark.timeout(30)
def test_a_fifo_swapped_for_a_file_after_create_gets_nothing_written(tmp_path, caplog):
    async def scenario():
        out = tmp_path / "out"
        os.mkfifo(out)
        io = ProcessStdio.create("", str(out), "", PortAllocator(), tmp_path / "marks")
        out.unlink()
        out.write_text("precious\n")  # a file now stands where the FIFO was
        guest = Guest(tmp_path)
        guest.output(io.ports["stdout"], b"container output\n")
        io.start(UnixPortTransport(str(tmp_path)))
        await io.outputs_done(5)
        await io.close()
        guest.close()

    with caplog.at_level("WARNING"):
        asyncio.run(scenario())
    assert (tmp_path / "out").read_text() == "precious\n"
    assert "a regular file, not a FIFO" in caplog.text


@pytest.mark.timeout(30)
def test_stdin_opened_before_containerd_writes_is_not_taken_for_eof(tmp_path):
    """The relay opens stdin at once (non-blocking); containerd's writer comes later."""
    async def scenario():
        stdin = tmp_path / "in"
        os.mkfifo(stdin)
        io = ProcessStdio.create(str(stdin), "", "", PortAllocator(), tmp_path / "marks")
        guest = Guest(tmp_path)
        got = guest.stdin(io.ports["stdin"])
        io.start(UnixPortTransport(str(tmp_path)))
        await asyncio.sleep(0.5)
        assert not got.done()
        writer = os.open(stdin, os.O_WRONLY | os.O_NONBLOCK)  # the relay is its reader already
        os.write(writer, b"late input")
        os.close(writer)
        await io.stdin_done(5)
        data = await asyncio.wait_for(got, 5)
        await io.close()
        guest.close()
        return data

    assert asyncio.run(scenario()) == b"late input"
