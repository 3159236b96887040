"""A helper's stdout+stderr through a pipe into a capped log (host_sandboxer/vmm/helper_output.py):
a flood stays under the cap, the last words before an exit are in the tail, a restarted daemon
reads the same pipe again, and the real QEMU and virtiofsd survive writing with no reader."""
import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from host_sandboxer.config import SharefsConfig
from host_sandboxer.vmm import process
from host_sandboxer.vmm.capped_log import rotated_path
from host_sandboxer.vmm.helper_output import HelperOutput

VIRTIOFSD = SharefsConfig().virtiofsd
SIGPIPE_BIT = 1 << 12  # signal 13 in /proc/PID/status SigIgn/SigCgt

# Writes `megabytes` MiB of lines as fast as the pipe takes them (a full pipe is EAGAIN: the
# write end is non-blocking), then "the end". Python ignores SIGPIPE: with no reader it goes on.
FLOOD = textwrap.dedent("""
    import os, sys, time
    def put(data):
        while data:
            try:
                data = data[os.write(1, data):]
            except BlockingIOError:
                time.sleep(0.001)
    line = b"x" * 1023 + b"\\n"
    for _ in range(int(sys.argv[1]) * 1024):
        put(line)
    put(b"the end\\n")
""")


def test_a_flood_stays_under_the_cap_and_the_newest_output_is_kept(tmp_path):
    limit = 64 * 1024
    output = HelperOutput(tmp_path / "helper.log", limit=limit)

    async def scenario():
        proc = await process.spawn([sys.executable, "-c", FLOOD, "20"], output)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        return output.tail(1)

    assert asyncio.run(scenario()) == "the end"
    sizes = [p.stat().st_size for p in (output.path, rotated_path(output.path))]
    assert max(sizes) <= limit  # 20 MiB written, at most 2 x 64 KiB kept
    assert output.path.read_bytes().endswith(b"the end\n")


def test_the_last_words_before_an_exit_are_in_the_tail(tmp_path):
    """What `failure()` quotes: read from the pipe on demand, not only when the loop gets to it."""
    output = HelperOutput(tmp_path / "helper.log")

    async def scenario():
        proc = await process.spawn(["sh", "-c", "echo starting; echo 'fatal: no such device' >&2; exit 3"], output)
        assert await proc.wait() == 3
        return output.tail(2)

    assert asyncio.run(scenario()) == "starting\nfatal: no such device"


# Writes one word per line read on stdin, then says on stderr whether the pipe took it.
WORDS = textwrap.dedent("""
    import os, sys
    for word in (b"before", b"lost", b"after"):
        sys.stdin.readline()
        try:
            os.write(1, word + b"\\n")
            os.write(2, b"written\\n")
        except BrokenPipeError:
            os.write(2, b"EPIPE\\n")
""")


def test_a_restarted_daemon_reads_the_same_pipe_again(tmp_path):
    """The first reader goes away (the daemon crashed); the helper writes on (EPIPE, no death);
    a new reader opens /proc/PID/fd/1 and the log goes on where it was."""
    def next_word(helper) -> bytes:
        helper.stdin.write(b"go\n")
        helper.stdin.flush()
        return helper.stderr.readline().strip()

    async def first_daemon():
        output = HelperOutput(tmp_path / "helper.log")
        write_end = output.child_end()
        helper = subprocess.Popen([sys.executable, "-c", WORDS], stdin=subprocess.PIPE, stdout=write_end,
                                  stderr=subprocess.PIPE)
        os.close(write_end)
        assert next_word(helper) == b"written"
        output.close()
        assert next_word(helper) == b"EPIPE"  # nobody reads: lost, and the helper lives on
        return helper

    async def second_daemon(helper):
        output = HelperOutput(tmp_path / "helper.log")
        assert output.reattach(helper.pid)
        assert next_word(helper) == b"written"
        assert await asyncio.get_running_loop().run_in_executor(None, helper.wait, 10) == 0
        return output.tail()

    helper = asyncio.run(first_daemon())
    assert asyncio.run(second_daemon(helper)) == "before\nafter"


def test_reattach_refuses_what_is_not_a_pipe(tmp_path):
    with open(tmp_path / "plain.log", "ab") as plain:
        sleeper = subprocess.Popen(["sleep", "30"], stdout=plain)
    try:
        async def scenario():
            return HelperOutput(tmp_path / "helper.log").reattach(sleeper.pid)
        assert asyncio.run(scenario()) is False
    finally:
        sleeper.kill()
        sleeper.wait()


def _pids_with_children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid] + [p for child in children for p in _pids_with_children(int(child))]


def _survives_sigpipe(pid: int) -> bool:
    """SIGPIPE ignored or caught: a write with no reader fails with EPIPE instead of killing."""
    fields = dict(line.split(":\t") for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if line.startswith(("SigIgn", "SigCgt")))
    return bool((int(fields["SigIgn"], 16) | int(fields["SigCgt"], 16)) & SIGPIPE_BIT)


@pytest.mark.skipif(not VIRTIOFSD.is_file(), reason=f"{VIRTIOFSD} absent")
def test_qemu_and_virtiofsd_survive_a_write_with_no_reader(tmp_path):
    """Why the pipe is safe for helpers that outlive the daemon."""
    (tmp_path / "share").mkdir()

    async def scenario():
        fsd_output, qemu_output = HelperOutput(tmp_path / "fsd.log"), HelperOutput(tmp_path / "qemu.log")
        fsd = await process.spawn([str(VIRTIOFSD), f"--socket-path={tmp_path}/fs.sock",
                                   "-o", f"source={tmp_path}/share"], fsd_output)
        qemu = await process.spawn(["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
                                    "-monitor", "none", "-S"], qemu_output)
        try:
            while not (tmp_path / "fs.sock").exists():  # listening: its signal handlers are set
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            return [_survives_sigpipe(pid) for proc in (fsd, qemu) for pid in _pids_with_children(proc.pid)]
        finally:
            for proc in (fsd, qemu):
                await process.stop(proc)

    assert all(asyncio.run(scenario()))
