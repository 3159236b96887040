"""The generated protos import as vmm_common.protos.* and match upstream's wire contract.

Field numbers and method names below were read from containerd (api/), containerd/ttrpc,
containerd/cgroups and kuasar-io/kuasar (vmm/common/src/protos/sandbox.proto).
"""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "vmm_common" / "protos"


def generated_modules():
    return sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts) for p in GENERATED.rglob("*_pb2*.py")
    )


def test_every_proto_has_an_importable_module():
    protos = sorted(ROOT.glob("proto/**/*.proto"))
    modules = generated_modules()
    for proto in protos:
        rel = proto.relative_to(ROOT / "proto").with_suffix("")
        name = "vmm_common.protos." + ".".join(rel.parts) + "_pb2"
        assert name in modules, f"{proto} was not generated"
    for name in modules:
        importlib.import_module(name)


def genproto() -> str:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "genproto.py")],
                          capture_output=True, text=True, check=True).stdout


def test_generator_is_a_noop_when_inputs_are_unchanged():
    genproto()  # brings the tree up to date if a proto changed since the last run
    before = {p: p.stat().st_mtime_ns for p in GENERATED.rglob("*_pb2.py")}
    assert genproto() == ""
    assert before == {p: p.stat().st_mtime_ns for p in GENERATED.rglob("*_pb2.py")}


def number(message, field):
    return message.DESCRIPTOR.fields_by_name[field].number


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_task_service(version):
    shim = importlib.import_module(f"vmm_common.protos.containerd.task.{version}.shim_pb2")
    service = shim.DESCRIPTOR.services_by_name["Task"]
    assert service.full_name == f"containerd.task.{version}.Task"
    methods = {m.name for m in service.methods}
    assert {"State", "Create", "Start", "Delete", "Pids", "Pause", "Resume", "Checkpoint",
            "Kill", "Exec", "ResizePty", "CloseIO", "Update", "Wait", "Stats", "Connect",
            "Shutdown"} <= methods
    assert ("Events" in methods) == (version == "v3")
    assert number(shim.CreateTaskRequest, "stdin") == 5
    assert number(shim.CreateTaskRequest, "stdout") == 6
    assert number(shim.CreateTaskRequest, "options") == 10
    assert number(shim.StateResponse, "exec_id") == 11
    assert number(shim.KillRequest, "all") == 4
    assert number(shim.ConnectResponse, "version") == 3
    assert shim.StateResponse.DESCRIPTOR.fields_by_name["status"].enum_type.full_name == (
        "containerd.v1.types.Status"
    )


def test_sandbox_controller():
    from vmm_common.protos.containerd.services.sandbox.v1 import sandbox_pb2 as sb

    service = sb.DESCRIPTOR.services_by_name["Controller"]
    assert service.full_name == "containerd.services.sandbox.v1.Controller"
    assert [m.name for m in service.methods] == [
        "Create", "Start", "Platform", "Stop", "Wait", "Status", "Shutdown", "Metrics", "Update",
    ]
    assert number(sb.ControllerCreateRequest, "sandboxer") == 10
    assert number(sb.ControllerCreateRequest, "netns_path") == 4
    assert number(sb.ControllerStartResponse, "address") == 5
    assert number(sb.ControllerStartResponse, "version") == 6
    assert number(sb.ControllerStatusResponse, "address") == 8
    assert number(sb.ControllerUpdateRequest, "fields") == 4


def test_ttrpc_envelopes():
    from vmm_common.protos.ttrpc import request_pb2

    assert request_pb2.Request.DESCRIPTOR.full_name == "ttrpc.Request"
    assert number(request_pb2.Request, "timeout_nano") == 4
    assert number(request_pb2.Request, "metadata") == 5
    assert number(request_pb2.Response, "status") == 1
    status = request_pb2.Response.DESCRIPTOR.fields_by_name["status"].message_type
    assert status.full_name == "google.rpc.Status"
    assert [f.number for f in status.fields] == [1, 2, 3]


def test_kuasar_sandbox_service():
    from vmm_common.protos import SANDBOX_SERVICE
    from vmm_common.protos.kuasar import sandbox_pb2

    service = sandbox_pb2.DESCRIPTOR.services_by_name["SandboxService"]
    assert service.full_name == SANDBOX_SERVICE == "grpc.SandboxService"
    assert service.methods_by_name["GetEvents"].output_type.full_name == (
        "containerd.services.events.ttrpc.v1.Envelope"
    )
    assert {m.name for m in service.methods} == {
        "UpdateInterfaces", "UpdateRoutes", "Check", "ExecVMProcess", "SyncClock",
        "GetEvents", "SetupSandbox",
    }
    assert number(sandbox_pb2.Interface, "raw_flags") == 7
    assert number(sandbox_pb2.Route, "family") == 6
    assert number(sandbox_pb2.SyncClockPacket, "Delta") == 5


def test_events_and_stats_types():
    from vmm_common.protos.containerd.events import task_pb2
    from vmm_common.protos.containerd.runc.v1 import oci_pb2
    from vmm_common.protos.io.containerd.cgroups.v1 import metrics_pb2 as v1
    from vmm_common.protos.io.containerd.cgroups.v2 import metrics_pb2 as v2

    assert task_pb2.TaskExit.DESCRIPTOR.full_name == "containerd.events.TaskExit"
    assert number(task_pb2.TaskExit, "exited_at") == 5
    assert number(task_pb2.TaskDelete, "id") == 5
    assert oci_pb2.Options.DESCRIPTOR.full_name == "containerd.runc.v1.Options"
    assert number(oci_pb2.Options, "task_api_version") == 13
    assert v1.Metrics.DESCRIPTOR.full_name == "io.containerd.cgroups.v1.Metrics"
    assert number(v2.Metrics, "memory") == 4
    assert number(v2.MemoryStat, "usage") == 32
