"""run_capture: a command's output through the Reaper (forked subreaper children, as in
test_agent_reaper, so waitpid(-1) never touches pytest's own children)."""

import asyncio
import os

from test_agent_reaper import in_child

from vmm_task.capture import OutputTooLarge, run_capture


def test_stdout_stderr_stdin_and_exit_code():
    async def body(reaper):
        result = await run_capture(reaper, ["sh", "-c", "cat; echo oops >&2; exit 5"],
                                   stdin=b"x" * 300_000)
        return result.code, len(result.stdout), result.stderr

    assert in_child(body) == (5, 300_000, b"oops\n")


def test_background_process_holding_stdout_does_not_block():
    async def body(reaper):
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await run_capture(reaper, ["sh", "-c", "sleep 5 & echo $!"])
        elapsed = loop.time() - started
        orphan = int(result.stdout)
        os.kill(orphan, 9)
        return elapsed, (await reaper.wait_pid(orphan)).code

    elapsed, orphan_code = in_child(body)
    assert elapsed < 2
    assert orphan_code == 128 + 9


def test_output_over_the_limit_is_an_error_and_kills_the_command():
    async def body(reaper):
        try:
            await run_capture(reaper, ["sh", "-c", "yes"], max_output=100_000)
        except OutputTooLarge as e:
            await asyncio.sleep(0.2)
            return str(e), reaper.pending
        return None, reaper.pending

    message, pending = in_child(body)
    assert "more than 100000 bytes" in message
    assert pending == 0


def test_cancelling_the_caller_kills_the_command():
    async def body(reaper):
        task = asyncio.ensure_future(run_capture(reaper, ["sleep", "30"]))
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.2)
        return reaper.pending, len(os.listdir("/proc/self/fd"))

    pending, open_fds = in_child(body)
    assert pending == 0
    assert open_fds < 20
