"""Task lifecycle against the dev-mode agent with real crun: create/start/wait/delete with exit
codes, state transitions, events, exec, kill with and without `all`."""
import asyncio
import collections
import signal

from vmm_common import ttrpc
from vmm_common.protos.containerd.task.v2 import shim_pb2 as pb
from vmm_common.protos.containerd.types.task import task_pb2 as types


def test_exit_code_output_and_states(agent, bundles):
    bundle = bundles.make(["sh", "-c", "echo out; echo err >&2; exit 7"])
    out, err = bundle.file("out"), bundle.file("err")

    async def body(t):
        pid = await t.create(bundle, stdout=str(out), stderr=str(err))
        assert pid > 0
        state = await t.state(bundle.id)
        assert (state.status, state.pid, state.bundle) == (types.CREATED, pid, str(bundle.path))
        assert await t.start(bundle.id) == pid
        assert await t.wait(bundle.id) == 7
        state = await t.state(bundle.id)
        assert state.status == types.STOPPED and state.exit_status == 7
        assert state.exited_at.seconds > 0
        deleted = await t.delete(bundle.id)
        assert (deleted.pid, deleted.exit_status) == (pid, 7)
        topics = [topic for topic, _ in await t.events()]
        assert topics[-4:] == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
        return pid

    agent.run(body)
    assert out.read_text() == "out\n" and err.read_text() == "err\n"


def test_exec_runs_beside_init_and_reports_its_own_exit(agent, bundles):
    bundle = bundles.make(["sleep", "1000"])
    out = bundle.file("exec-out")

    async def body(t):
        await t.create(bundle)
        await t.start(bundle.id)
        await t.exec(bundle.id, "e1", ["sh", "-c", "echo from exec; exit 3"], stdout=str(out))
        assert (await t.state(bundle.id, "e1")).status == types.CREATED
        exec_pid = await t.start(bundle.id, "e1")
        assert exec_pid > 0
        assert await t.wait(bundle.id, "e1") == 3
        assert (await t.delete(bundle.id, "e1")).exit_status == 3
        assert (await t.state(bundle.id)).status == types.RUNNING
        await t.remove(bundle.id)
        topics = [topic for topic, _ in await t.events()]
        for topic in ("/tasks/exec-added", "/tasks/exec-started", "/tasks/exit"):
            assert topic in topics

    agent.run(body)
    assert out.read_text() == "from exec\n"


def test_kill_init_alone_and_with_all(agent, bundles):
    # init ignores TERM; a background child too: Kill(all) reaches every process
    script = "trap '' TERM; sleep 1000 & echo ready; wait"
    bundle = bundles.make(["sh", "-c", script], pid_namespace=False)

    async def body(t):
        await t.create(bundle, stdout=str(bundle.file("out")))
        await t.start(bundle.id)
        while "ready" not in bundle.file("out").read_text():
            await asyncio.sleep(0.05)
        await t.kill(bundle.id, signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert (await t.state(bundle.id)).status == types.RUNNING
        pids = (await t.call("Pids", pb.PidsRequest(id=bundle.id))).processes
        assert len(pids) == 2
        await t.kill(bundle.id, signal.SIGKILL, all=True)
        assert await t.wait(bundle.id) == 128 + signal.SIGKILL
        error = await t.error("Kill", pb.KillRequest(id=bundle.id, signal=signal.SIGKILL))
        assert error.code.name == "NOT_FOUND" and "already exited" in error.message
        await t.delete(bundle.id)
        return [p.pid for p in pids]

    pids = agent.run(body)
    for pid in pids:  # none survives, none is left a zombie of the agent
        assert pid not in agent.children()


async def _kill_outcome(t, cid: str, all_processes: bool) -> str:
    """"ok" or the code name a Kill got; any other failure is raised."""
    try:
        await t.kill(cid, signal.SIGKILL, all=all_processes)
    except ttrpc.RpcError as error:
        return error.code.name
    return "ok"


def test_kill_of_an_exiting_process_is_not_found(agent, bundles):
    # containerd's stop path Kills processes that may just have exited and ignores only
    # NOT_FOUND, the runc shim's answer for them (checkKillError: "process already finished").
    # Here an exec's shell exits at once but a background child keeps its stdout open: the exit
    # is reaped and not yet reported (its output is drained first), the window the runtime
    # cannot signal. (An init without a PID namespace of its own gets no such window: what it
    # leaves is killed as soon as it is reaped, test_task_podns.py.)
    bundle = bundles.make(["sleep", "1000"])

    async def body(t):
        await t.create(bundle)
        await t.start(bundle.id)
        await t.exec(bundle.id, "leaver", ["sh", "-c", "sleep 1000 & exit 0"],
                     stdout=str(bundle.file("exec-out")))
        await t.start(bundle.id, "leaver")
        await asyncio.sleep(0.5)
        assert (await t.state(bundle.id, "leaver")).status == types.RUNNING  # exit not reported yet
        request = pb.KillRequest(id=bundle.id, exec_id="leaver", signal=signal.SIGKILL)
        error = await t.error("Kill", request)
        assert error.code.name == "NOT_FOUND" and "already exited" in error.message, error
        await t.kill(bundle.id, signal.SIGKILL, all=True)  # the container's all: the child too
        assert await t.wait(bundle.id, "leaver") == 0
        await t.wait(bundle.id)
        await t.delete(bundle.id)

    agent.run(body)


def test_kill_racing_a_container_that_exits_at_once(agent, bundles):
    # Kill(9, all) and Kill(9) as containerd's stop sends them, right after Start, to containers
    # exiting a little later each round: some Kills meet the exit (reaped, not yet reported)
    made = [bundles.make(["sleep", f"0.{delay_ms:03d}"]) for delay_ms in range(60)]

    async def body(t):
        outcomes = []
        for bundle in made:
            await t.create(bundle, stdout=str(bundle.file("out")))
            await t.start(bundle.id)
            outcomes.append(await _kill_outcome(t, bundle.id, True))
            outcomes.append(await _kill_outcome(t, bundle.id, False))
            await t.wait(bundle.id)
            await t.delete(bundle.id)
        return outcomes

    outcomes = agent.run(body, timeout=300)
    assert set(outcomes) <= {"ok", "NOT_FOUND"}, collections.Counter(outcomes)
