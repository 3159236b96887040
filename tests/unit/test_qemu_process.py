"""Helper processes (host_sandboxer/vmm/process.py): spawned with no Python between fork and
exec, tied to our life only when asked, adopted after a restart by pid + start time."""
import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from host_sandboxer.containment.launch import Confinement
from host_sandboxer.vmm import process
from host_sandboxer.vmm.helper_output import HelperOutput

# Spawns helpers while gRPC's threads are busy serving and calling, as in the daemon; with
# gRPC's fork support at its default. A preexec function here crashed children (SIGSEGV/SIGABRT).
BUSY_GRPC_SPAWNS = textwrap.dedent("""
    import asyncio, sys, tempfile
    from pathlib import Path
    import grpc
    from google.protobuf import empty_pb2
    from host_sandboxer.containment.launch import Confinement
    from host_sandboxer.vmm import process
    from host_sandboxer.vmm.helper_output import HelperOutput
    from vmm_common.protos.containerd.services.events.v1 import events_pb2, events_pb2_grpc

    class Events(events_pb2_grpc.EventsServicer):
        async def Publish(self, request, context):
            return empty_pb2.Empty()

    async def main(work, spawns):
        server = grpc.aio.server()
        events_pb2_grpc.add_EventsServicer_to_server(Events(), server)
        server.add_insecure_port(f"unix://{work}/s.sock")
        await server.start()
        channel = grpc.aio.insecure_channel(f"unix://{work}/s.sock")
        stub = events_pb2_grpc.EventsStub(channel)
        busy = True

        async def caller():
            while busy:
                await stub.Publish(events_pb2.PublishRequest(topic="/x"))

        callers = [asyncio.create_task(caller()) for _ in range(4)]
        statuses = []
        for i in range(spawns):
            proc = await process.spawn(["true"], HelperOutput(work / "out.log"),
                                       confinement=Confinement(die_with_us=bool(i % 2)))
            statuses.append(await proc.wait())
        busy = False
        await asyncio.gather(*callers)
        await channel.close()
        await server.stop(None)
        print(" ".join(map(str, statuses)))

    with tempfile.TemporaryDirectory() as work:
        asyncio.run(main(Path(work), int(sys.argv[1])))
""")


def test_sixty_spawns_in_a_busy_grpc_process_all_succeed():
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    result = subprocess.run([sys.executable, "-c", BUSY_GRPC_SPAWNS, "60"], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["0"] * 60


def _spawn_sleeper_from_a_child(tmp_path, die_with_us: bool) -> int:
    """A short-lived Python process spawns `sleep 60` and exits; returns the sleeper's pid."""
    program = textwrap.dedent(f"""
        import asyncio
        from pathlib import Path
        from host_sandboxer.containment.launch import Confinement
        from host_sandboxer.vmm import process
        from host_sandboxer.vmm.helper_output import HelperOutput

        async def main():
            proc = await process.spawn(["sleep", "60"], HelperOutput(Path({str(tmp_path / "out.log")!r})),
                                       confinement=Confinement(die_with_us={die_with_us}))
            print(proc.pid)

        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30, check=True)
    return int(out.stdout)


def _running(pid: int, timeout: float = 2.0) -> bool:
    """Whether `pid` still runs after up to `timeout` (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                alive = f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            alive = False
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def test_a_helper_dies_with_us_only_when_asked(tmp_path):
    doomed = _spawn_sleeper_from_a_child(tmp_path, die_with_us=True)
    survivor = _spawn_sleeper_from_a_child(tmp_path, die_with_us=False)
    try:
        assert not _running(doomed)
        assert _running(survivor, timeout=0)
        assert os.getsid(survivor) == survivor  # its own session: a terminal's Ctrl-C is not for it
    finally:
        os.kill(survivor, signal.SIGKILL)


def test_a_missing_binary_is_an_oserror_with_or_without_the_wrapper(tmp_path):
    async def scenario(die_with_us):
        try:
            await process.spawn([str(tmp_path / "nothing")], HelperOutput(tmp_path / "out.log"),
                                confinement=Confinement(die_with_us=die_with_us))
        except FileNotFoundError as e:
            return e.strerror
    assert asyncio.run(scenario(True)) == asyncio.run(scenario(False)) == "No such file or directory"


def test_env_is_set_on_top_of_ours_through_the_wrapper(tmp_path, monkeypatch):
    """QEMU gets MALLOC_ARENA_MAX this way (vmm/qemu.py): the wrapper must pass it on."""
    monkeypatch.setenv("OURS", "kept")

    async def scenario():
        output = HelperOutput(tmp_path / "out.log")
        proc = await process.spawn(["sh", "-c", 'echo "$OURS $MALLOC_ARENA_MAX"'], output,
                                   confinement=Confinement(die_with_us=True),
                                   env={"MALLOC_ARENA_MAX": "1"})
        await proc.wait()
        output.close()

    asyncio.run(scenario())
    assert (tmp_path / "out.log").read_text().split() == ["kept", "1"]


def test_adopt_checks_the_start_time_and_watches_the_exit(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        record = {"pid": sleeper.pid, "start_time": process.start_time(sleeper.pid)}

        async def scenario():
            assert process.adopt(dict(record, start_time=record["start_time"] + 1)) is None  # a reused pid
            assert process.adopt({"pid": 0}) is None and process.adopt(None) is None
            adopted = process.adopt(record)
            assert adopted.returncode is None
            status = await process.stop(adopted, grace_s=2.0)  # SIGTERM through the pidfd
            return status, adopted.returncode

        assert asyncio.run(scenario()) == (process.UNKNOWN_STATUS, process.UNKNOWN_STATUS)
        assert sleeper.wait(5) == -signal.SIGTERM
        assert process.start_time(sleeper.pid) is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_kill_strays_kills_what_names_the_directory_and_nothing_else(tmp_path):
    pod_dir, other = tmp_path / "pod", tmp_path / "pod2"
    def sleeper(path):  # a process that never forks: no child briefly carries its command line
        return subprocess.Popen([sys.executable, "-c", "import sys, time; print(flush=True); time.sleep(60)", path],
                                stdout=subprocess.PIPE)
    stray, bystander = sleeper(f"{pod_dir}/vsock.sock"), sleeper(f"{other}/vsock.sock")
    for proc in (stray, bystander):
        proc.stdout.readline()  # running
    try:
        assert process.kill_strays(pod_dir) == [stray.pid]
        assert stray.wait(5) == -signal.SIGKILL
        assert bystander.poll() is None
    finally:
        for proc in (stray, bystander):
            proc.kill()
            proc.wait()


def _until(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


def test_stopped_finds_a_stopped_process_and_its_stopped_children():
    """What the shared-directory watch adds to its reason: virtiofsd forks into its sandbox."""
    parent = subprocess.Popen(["sh", "-c", "sleep 60 & wait"], start_new_session=True)
    try:
        children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
        child = int(_until(lambda: children.read_text().split())[0])
        assert process.stopped(parent.pid) == []
        os.killpg(parent.pid, signal.SIGSTOP)
        assert _until(lambda: len(process.stopped(parent.pid)) == 2)
        assert process.stopped(parent.pid) == [parent.pid, child]
        os.killpg(parent.pid, signal.SIGCONT)
        assert _until(lambda: process.stopped(parent.pid) == [])
        assert process.stopped(999_999_999) == []  # no such process
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
