"""The console reader: line splitting and time stamps, markers, tail, and the size cap.

A plain unix-socket server stands in for QEMU's serial chardev (`server=on`: the same byte
stream).
"""
import asyncio

from host_sandboxer.vmm.console import MAX_LINE, ConsoleLog
from vmm_common.capped_text import MAX_CHARS


async def connected(tmp_path, limit=1 << 20):
    """A ConsoleLog connected to a stand-in QEMU; returns it and QEMU's end of the stream."""
    peers = asyncio.Queue()
    server = await asyncio.start_unix_server(lambda r, w: peers.put_nowait(w), path=str(tmp_path / "console.sock"))
    console = ConsoleLog(tmp_path / "console.log", tmp_path / "console.sock", limit=limit)
    await console.connect()
    writer = await asyncio.wait_for(peers.get(), 5)
    server.close()
    return console, writer


async def settle(console, needle):
    return await asyncio.wait_for(console.line_containing(needle), 5)


def test_lines_markers_and_tail(tmp_path):
    async def scenario():
        console, writer = await connected(tmp_path)
        ready = console.line_containing("vmm-task ready")
        writer.write(b"[    0.000000] Linux version 6.1\r\n[    1.250000] Run /init as ")
        await writer.drain()
        await settle(console, "Linux version")
        assert not ready.done()
        writer.write(b"init process\nvmm-task ready\npartial")
        await writer.drain()
        line = await asyncio.wait_for(ready, 5)
        assert line.text == "vmm-task ready" and line.guest_time is None
        init = await settle(console, "Run /init")  # a marker asked for after the fact is found too
        assert init.guest_time == 1.25 and init.host_time <= line.host_time
        assert console.first_output.done()
        assert console.tail(2) == "[    1.250000] Run /init as init process\nvmm-task ready\npartial"
        writer.close()
        await console.close()
        assert (tmp_path / "console.log").read_bytes().endswith(b"vmm-task ready\npartial")
        assert not (tmp_path / "console.sock").exists()
    asyncio.run(scenario())


def test_endless_line_is_cut_and_log_is_capped(tmp_path):
    async def scenario():
        console, writer = await connected(tmp_path, limit=10_000)
        writer.write(b"x" * (3 * MAX_LINE) + b"\nend\n")
        await writer.drain()
        await settle(console, "end")
        # what error messages and Status quote of each guest line is capped, the cut marked
        cut = f"{'x' * MAX_CHARS}… [{MAX_LINE - MAX_CHARS} more characters cut]"
        assert console.tail(10).splitlines() == [cut] * 3 + ["end"]
        writer.close()
        await console.close()
        sizes = [(tmp_path / name).stat().st_size for name in ("console.log", "console.log.1")]
        assert sizes == [3 * MAX_LINE + 5 - 10_000, 10_000]  # rotated once, at exactly the cap
        assert (tmp_path / "console.log").read_bytes().endswith(b"end\n")
    asyncio.run(scenario())


def test_a_restarted_reader_appends_to_the_log(tmp_path):
    """A restarted daemon connects to the same VM's console again: the log goes on."""
    async def scenario():
        for text in (b"before restart\n", b"after restart\n"):
            console, writer = await connected(tmp_path)
            writer.write(text)
            await writer.drain()
            await settle(console, text.decode().strip())
            writer.close()
            await console.close()
        assert (tmp_path / "console.log").read_bytes() == b"before restart\nafter restart\n"
    asyncio.run(scenario())
