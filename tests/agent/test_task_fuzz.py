"""Fuzz: at least 10,000 random, mutated and randomly-filled payloads across every method of
every service the agent serves (Task, SandboxService, Health), with live containers to aim at.
The agent must answer each with a status (never INTERNAL from the Task service: every failure
there is a named problem), still answer Check afterwards, and leak no process once whatever the
fuzz created is removed through the API.

"Answered with an error" and "did not answer" are told apart: a call not answered within
ANSWER_S is a hang and fails the test, naming the method. Two methods wait by contract, Wait
(until its process exits) and GetEvents (until an event is queued): they run without a deadline
and must have answered once every container is removed, except GetEvents calls left waiting
while the agent has no event queued.

Dev mode keeps the host safe by itself: network, clock and global sysctl changes are refused
outside the VM. Stdio paths in the seeds are empty so no mutation can aim output at a host file.
VMM_TASK_FUZZ_SEED reproduces a run."""
import asyncio
import os
import random
import signal

from google.protobuf import empty_pb2
from google.protobuf.descriptor import FieldDescriptor

from vmm_common import ttrpc
from vmm_common.protos.containerd.task.v2 import shim_pb2
from vmm_common.protos.kuasar import sandbox_pb2
from vmm_common.protos.vmmtask.v1 import health_pb2

PAYLOADS = 10_500
IN_FLIGHT = 24
ANSWER_S = 30.0  # any handler answers in milliseconds; this is "never", on a loaded machine too
LONG_POLLS = {("containerd.task.v2.Task", "Wait"), ("grpc.SandboxService", "GetEvents")}
SERVICES = [("containerd.task.v2.Task", shim_pb2, "Task"),
            ("grpc.SandboxService", sandbox_pb2, "SandboxService"),
            ("vmmtask.v1.Health", health_pb2, "Health")]
NASTY_STRINGS = ["", "..", "../../etc", "/", "a/b", "x" * 200, "\0", "é", "-", "vsock://",
                 "vsock://x:y", "vsock://0", "fifo://relative", "/dev/null", "%s%n", "fz-live"]


class RawPayload:
    """Bytes sent as a request body as they are (the client serialises whatever it is given)."""

    def __init__(self, data: bytes):
        self.data = data

    def SerializeToString(self) -> bytes:
        return self.data


def _methods():
    """(service, method, request class, response class) of every RPC in the protos."""
    from google.protobuf import symbol_database
    db = symbol_database.Default()
    for service, module, name in SERVICES:
        for method in module.DESCRIPTOR.services_by_name[name].methods:
            yield (service, method.name, db.GetSymbol(method.input_type.full_name),
                   db.GetSymbol(method.output_type.full_name))


def _random_value(rng: random.Random, field: FieldDescriptor):
    if field.type == FieldDescriptor.TYPE_STRING:
        return rng.choice(NASTY_STRINGS + [f"fz-{rng.randrange(4)}",
                                           "".join(chr(rng.randrange(32, 0x2000))
                                                   for _ in range(rng.randrange(12)))])
    if field.type == FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.randrange(64))
    if field.type == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return rng.uniform(-1e9, 1e9)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return rng.choice(field.enum_type.values).number
    unsigned = field.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64,
                              FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64)
    bits = 64 if "64" in str(field.cpp_type) or field.cpp_type in (
        FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64) else 32
    edge = [0, 1, 2, 9, 15, 64, 65, 65535, 2**bits // 2 - 1]
    value = rng.choice(edge + [rng.randrange(2**(bits - 1))])
    return value if unsigned or rng.random() < 0.7 else -value


def _fill(rng: random.Random, message, depth: int = 0):
    for field in message.DESCRIPTOR.fields:
        if rng.random() < 0.4:
            continue
        repeated = field.is_repeated
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                continue
            if depth > 2:
                continue
            if field.message_type.full_name == "google.protobuf.Any":
                target = (getattr(message, field.name).add() if repeated
                          else getattr(message, field.name))
                target.type_url = rng.choice(["", "PodSandboxConfig", "x/y", "a" * 300])
                target.value = rng.choice([b"", b"{}", b'{"args": ["true"]}', rng.randbytes(40)])
                continue
            target = getattr(message, field.name).add() if repeated else getattr(message, field.name)
            _fill(rng, target, depth + 1)
        elif repeated:
            getattr(message, field.name).extend(_random_value(rng, field)
                                                for _ in range(rng.randrange(3)))
        else:
            setattr(message, field.name, _random_value(rng, field))
    return message


def _mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        choice = rng.randrange(4)
        if choice == 0 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif choice == 1:
            data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
        elif choice == 2 and data:
            del data[rng.randrange(len(data))]
        else:
            data = data[:rng.randrange(len(data) + 1)]
    return bytes(data)


def _seed(request_class, bundle, live_id: str):
    """A valid request aimed at the fuzz's live container (or its bundle, for Create)."""
    request = request_class()
    fields = request.DESCRIPTOR.fields_by_name
    if "id" in fields:
        request.id = live_id
    if "exec_id" in fields:
        request.exec_id = "fz-exec"
    if "bundle" in fields:
        request.id, request.bundle = "fz-new", str(bundle.path)
        request.rootfs.extend(bundle.rootfs)
    if "signal" in fields:
        request.signal = signal.SIGCONT
    return request


def test_fuzz_every_method_then_check_and_no_leak(agent, bundles):
    seed = int(os.environ.get("VMM_TASK_FUZZ_SEED", "20261124"))
    rng = random.Random(seed)
    live = bundles.make(["sleep", "1000"])
    spare = bundles.make(["sleep", "1000"])
    methods = list(_methods())
    assert len(methods) >= 27  # 17 Task + 7 SandboxService + 3 Health

    async def body(t):
        await t.create(live)
        await t.start(live.id)
        await t.exec(live.id, "fz-exec", ["sleep", "1000"])
        outcomes: dict[str, int] = {}
        internal: list[str] = []
        unanswered: list[str] = []
        waiting: dict[asyncio.Future, str] = {}  # long polls still without an answer

        def count(outcome: str) -> None:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

        async def one(service, method, request_class, response_class):
            kind = rng.randrange(3)
            if kind == 0:
                payload = RawPayload(rng.randbytes(rng.randrange(160)))
            elif kind == 1:
                payload = RawPayload(_mutate(rng, _seed(request_class, spare, live.id)
                                             .SerializeToString()))
            else:
                payload = _fill(rng, request_class())
            call = t.client.call(service, method, payload, response_class)
            if (service, method) in LONG_POLLS:
                waiting[asyncio.ensure_future(call)] = method
                return
            try:
                await asyncio.wait_for(call, ANSWER_S)
                count("OK")
            except ttrpc.RpcError as e:
                count(e.code.name)
                if e.code.name == "INTERNAL" and service.startswith("containerd"):
                    internal.append(f"{method}: {e.message}")
            except asyncio.TimeoutError:
                unanswered.append(method)

        def settle(done) -> None:
            for call in done:
                del waiting[call]
                error = call.exception()
                if isinstance(error, ttrpc.RpcError):
                    count(error.code.name)
                elif error is not None:
                    raise error
                else:
                    count("OK")

        pending = set()
        for _ in range(PAYLOADS):
            pending.add(asyncio.ensure_future(one(*rng.choice(methods))))
            if len(pending) >= IN_FLIGHT:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*pending)

        await t.client.call("vmmtask.v1.Health", "Check", health_pb2.HealthCheckRequest(),
                            health_pb2.HealthCheckResponse, timeout=5)
        await t.client.call("grpc.SandboxService", "Check", sandbox_pb2.CheckRequest(),
                            empty_pb2.Empty, timeout=5)
        # remove, through the API, every container the runtime still knows
        left = sorted(os.listdir(agent.run_dir / "oci"))
        for cid in left:
            try:
                await t.remove(cid)
            except ttrpc.RpcError as e:
                assert e.code.name == "NOT_FOUND", (cid, e)
        # every process is gone: each Wait answers; a GetEvents answers while events are queued
        deadline = asyncio.get_running_loop().time() + ANSWER_S
        while True:
            settle([call for call in waiting if call.done()])
            status = await t.client.call("vmmtask.v1.Health", "Status", empty_pb2.Empty(),
                                         health_pb2.StatusResponse, timeout=5)
            hung = sorted(method for method in waiting.values()
                          if method == "Wait" or status.events_queued)
            if not hung or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.wait(waiting, timeout=0.1)
        outcomes["waiting for an event"] = len(waiting)
        unanswered += hung
        for call in waiting:
            call.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        return outcomes, internal, unanswered, left, status

    outcomes, internal, unanswered, left, status = agent.run(body, timeout=600)
    print("fuzz outcomes", outcomes, "left", left)
    assert not unanswered, f"no answer within {ANSWER_S} s: {sorted(set(unanswered))}"
    assert sum(outcomes.values()) == PAYLOADS
    assert not internal, internal[:5]
    assert outcomes.get("INVALID_ARGUMENT", 0) > 1000 and outcomes.get("OK", 0) > 100, outcomes
    assert live.id in left
    assert status.zombies == 0
    # what is left under the agent: at most the pod's namespace holder (PID 1 of its own PID
    # namespace) if a fuzzed SetupSandbox succeeded; never a container or runtime process
    for pid in agent.children():
        with open(f"/proc/{pid}/status") as f:
            nspid = [line.split()[1:] for line in f if line.startswith("NSpid:")][0]
        assert nspid[-1] == "1" and len(nspid) == 2, f"leaked process {pid}: {nspid}"
    assert agent.alive()
