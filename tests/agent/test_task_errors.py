"""Error codes and messages of the Task service (the runc shim's rules): IDs that could escape a
directory are INVALID_ARGUMENT, unknown IDs NOT_FOUND, duplicates ALREADY_EXISTS, wrong states
FAILED_PRECONDITION, Checkpoint UNIMPLEMENTED; a runtime failure is an error, not a crash."""
import json
import os

from vmm_common.protos.containerd.task.v2 import shim_pb2 as pb

BAD_IDS = ["", "../escape", "a/b", ".hidden", "-dash", "x" * 129, "nul\0byte", "sp ace", "é"]


def test_bad_ids_are_invalid_argument(agent, bundles, tmp_path):
    async def body(t):
        for bad in BAD_IDS:
            for method, request in (
                    ("Create", pb.CreateTaskRequest(id=bad, bundle=str(tmp_path))),
                    ("State", pb.StateRequest(id=bad)),
                    ("Start", pb.StartRequest(id=bad)),
                    ("Kill", pb.KillRequest(id=bad, signal=9)),
                    ("Delete", pb.DeleteRequest(id=bad)),
                    ("Wait", pb.WaitRequest(id=bad)),
                    ("Pids", pb.PidsRequest(id=bad)),
                    ("Stats", pb.StatsRequest(id=bad))):
                error = await t.error(method, request)
                assert error.code.name == "INVALID_ARGUMENT", (method, bad, error)
                assert "invalid container id" in error.message

    agent.run(body)
    assert not os.path.exists(tmp_path.parent / "escape")


def test_unknown_ids_are_not_found(agent):
    async def body(t):
        for method, request in (
                ("State", pb.StateRequest(id="nosuch")), ("Start", pb.StartRequest(id="nosuch")),
                ("Kill", pb.KillRequest(id="nosuch", signal=15)),
                ("Delete", pb.DeleteRequest(id="nosuch")), ("Wait", pb.WaitRequest(id="nosuch")),
                ("Pause", pb.PauseRequest(id="nosuch")), ("Connect", pb.ConnectRequest(id="nosuch")),
                ("CloseIO", pb.CloseIORequest(id="nosuch", stdin=True))):
            error = await t.error(method, request)
            assert error.code.name == "NOT_FOUND" and "nosuch" in error.message, (method, error)

    agent.run(body)


def test_duplicates_wrong_states_and_unimplemented(agent, bundles):
    bundle = bundles.make(["sleep", "1000"])

    async def body(t):
        async def expect(code, method, request):
            error = await t.error(method, request)
            assert error.code.name == code, (method, error)
            assert bundle.id in error.message or code == "UNIMPLEMENTED", error.message

        await t.create(bundle)
        await expect("ALREADY_EXISTS", "Create", pb.CreateTaskRequest(
            id=bundle.id, bundle=str(bundle.path)))
        await expect("FAILED_PRECONDITION", "Resume", pb.ResumeRequest(id=bundle.id))
        await expect("FAILED_PRECONDITION", "Pause", pb.PauseRequest(id=bundle.id))
        exec_request = pb.ExecProcessRequest(id=bundle.id, exec_id="e1")
        exec_request.spec.value = b'{"args": ["true"], "cwd": "/"}'
        await expect("FAILED_PRECONDITION", "Exec", exec_request)
        await t.start(bundle.id)
        await expect("FAILED_PRECONDITION", "Start", pb.StartRequest(id=bundle.id))
        await expect("FAILED_PRECONDITION", "Delete", pb.DeleteRequest(id=bundle.id))
        await expect("FAILED_PRECONDITION", "ResizePty",
                     pb.ResizePtyRequest(id=bundle.id, width=80, height=24))
        await expect("NOT_FOUND", "State", pb.StateRequest(id=bundle.id, exec_id="nosuch"))
        await t.call("Exec", exec_request)
        await expect("ALREADY_EXISTS", "Exec", exec_request)
        bad_spec = pb.ExecProcessRequest(id=bundle.id, exec_id="e2")
        bad_spec.spec.value = b"\xff not json"
        await expect("INVALID_ARGUMENT", "Exec", bad_spec)
        await expect("UNIMPLEMENTED", "Checkpoint", pb.CheckpointTaskRequest(id=bundle.id))
        connected = await t.call("Connect", pb.ConnectRequest(id=bundle.id))
        assert connected.shim_pid == agent.pid and connected.task_pid > 0
        await t.call("Shutdown", pb.ShutdownRequest(id=bundle.id))  # a sandbox agent stays up
        await t.remove(bundle.id)

    agent.run(body)
    assert agent.alive()


def test_runtime_failures_are_errors_not_crashes(agent, bundles, tmp_path):
    bundle = bundles.make(["/no/such/program"])
    empty = tmp_path / "empty-bundle"
    empty.mkdir()

    async def body(t):
        error = await t.error("Create", pb.CreateTaskRequest(id="nobundle", bundle=str(empty)))
        assert error.code.name == "INVALID_ARGUMENT" and "config.json" in error.message
        error = await t.error("Create", pb.CreateTaskRequest(
            id=bundle.id, bundle=str(bundle.path), rootfs=bundle.rootfs))
        # crun checks the program at create: its own words come back, and nothing is left
        assert error.code.name == "UNKNOWN" and "/no/such/program" in error.message, error
        assert bundle.id in error.message
        assert (await t.error("State", pb.StateRequest(id=bundle.id))).code.name == "NOT_FOUND"
        other = bundles.make(["true"])  # the next container is fine, and a created one
        await t.create(other)             # can be deleted without being started
        assert (await t.delete(other.id)).exit_status == 128 + 9

    agent.run(body)
    assert agent.alive()


def test_unusable_stdio_strings_are_invalid_arguments(agent, bundles, tmp_path):
    """A bad stdio string is named in an INVALID_ARGUMENT (it was an INTERNAL AttributeError),
    and a listener made for a good string before it is released."""
    bundle = bundles.make(["true"])
    listener = tmp_path / "stdin.sock"
    cases = {"stdout": "vsock://notaport", "stderr": "unix://relative/path",
             "stdin": "relative/path", "terminal": "chardev3"}

    async def body(t):
        for stream, bad in cases.items():
            io = {"stdin": f"unix://{listener}", stream: bad} if stream != "terminal" else \
                {"stdout": bad, "terminal": True}
            error = await t.error("Create", pb.CreateTaskRequest(
                id=bundle.id, bundle=str(bundle.path), rootfs=bundle.rootfs, **io))
            assert error.code.name == "INVALID_ARGUMENT" and bad in error.message, error
            assert not listener.exists()
        assert (await t.error("State", pb.StateRequest(id=bundle.id))).code.name == "NOT_FOUND"

    agent.run(body)
    assert agent.alive()


def test_a_failed_create_names_the_runtimes_own_cause(agent, bundles):
    """runc's init stages log why they failed ("fatal") before runc's own summary ("can't get
    final child's PID from pipe: EOF"): the error quotes the cause, for runc and crun alike."""
    bundle = bundles.make(["true"])
    config = bundle.path / "config.json"
    spec = json.loads(config.read_text())
    for namespace in spec["linux"]["namespaces"]:
        if namespace["type"] == "network":
            namespace["path"] = "/etc/hostname"  # a file, not a network namespace
    config.write_text(json.dumps(spec))

    async def body(t):
        error = await t.error("Create", pb.CreateTaskRequest(
            id=bundle.id, bundle=str(bundle.path), rootfs=bundle.rootfs))
        assert error.code.name == "UNKNOWN" and "setns" in error.message, error
        assert (await t.error("State", pb.StateRequest(id=bundle.id))).code.name == "NOT_FOUND"

    agent.run(body)
    assert agent.alive()
