"""The daemon's Controller without booting a VM: the real vmm-sandboxer process on a private
socket, driven by a gRPC client from the generated stubs (VM paths: tests/vm/test_sandboxer.py)."""

import json
import os
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2

from vmm_common.protos.containerd.services.sandbox.v1 import sandbox_pb2 as sb
from vmm_common.protos.containerd.services.sandbox.v1 import sandbox_pb2_grpc as sb_grpc

REPO = Path(__file__).resolve().parents[2]
NS = (("containerd-namespace", "k8s.io"),)


@pytest.fixture
def controller():
    work = Path(tempfile.mkdtemp(prefix="vsbc-"))
    (work / "config.toml").write_text(
        f'[vm]\nkernel = "{work}/no-kernel"\ninitrd = "{work}/no-initrd"\n[containerd]\naddress = ""\n'
        '[containment]\ncgroups = false\n')  # no VM is booted: the host's cgroups are left alone
    sock = work / "ctl.sock"
    proc = subprocess.Popen([str(REPO / ".venv/bin/vmm-sandboxer"), "--listen", str(sock),
                             "--dir", str(work / "state"), "--config", str(work / "config.toml")],
                            stdout=subprocess.DEVNULL, stderr=open(work / "log", "wb"))
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (work / "log").read_text()
        time.sleep(0.05)
    channel = grpc.insecure_channel(f"unix://{sock}")
    yield sb_grpc.ControllerStub(channel), work
    channel.close()
    proc.terminate()
    proc.wait(10)
    subprocess.run(["rm", "-rf", str(work)], check=True)


def code(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_socket_and_state_are_root_only(controller):
    _, work = controller
    assert stat.S_IMODE(os.stat(work / "ctl.sock").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(work / "state").st_mode) == 0o700


def test_create_status_shutdown_of_a_pod_never_started(controller):
    ctl, work = controller
    ctl.Create(sb.ControllerCreateRequest(sandbox_id="p1"), metadata=NS, timeout=10)
    status = ctl.Status(sb.ControllerStatusRequest(sandbox_id="p1", verbose=True), timeout=10)
    assert (status.state, status.address, status.info["state"]) == ("SANDBOX_NOTREADY", "", "created")
    platform = ctl.Platform(sb.ControllerPlatformRequest(sandbox_id="p1"), timeout=10).platform
    assert platform.os == "linux" and platform.architecture
    ctl.Update(sb.ControllerUpdateRequest(sandbox_id="p1"), timeout=10)
    # Stop before Shutdown, as the CRI does: a Wait answered before or after the Stop sees exit 0
    # (after a Shutdown the pod is gone, so a Wait that arrived late would be NOT_FOUND).
    wait = ctl.Wait.future(sb.ControllerWaitRequest(sandbox_id="p1"), timeout=10)
    ctl.Stop(sb.ControllerStopRequest(sandbox_id="p1"), timeout=10)
    assert wait.result().exit_status == 0
    ctl.Shutdown(sb.ControllerShutdownRequest(sandbox_id="p1"), timeout=10)
    assert not (work / "state" / "p1").exists()


def test_a_wait_containerd_gives_up_leaves_the_pod_as_it_was(controller):
    """containerd restarting cancels the Wait it held: the pod must not take that for its end
    (it did: the cancelled call cancelled the pod's exit future, Status said exit_status 0 and
    task State said STOPPED, and CRI's recovery hung deleting a running container)."""
    ctl, _ = controller
    ctl.Create(sb.ControllerCreateRequest(sandbox_id="p1"), metadata=NS, timeout=10)
    abandoned = ctl.Wait.future(sb.ControllerWaitRequest(sandbox_id="p1"))
    time.sleep(0.5)
    abandoned.cancel()
    time.sleep(0.5)
    status = ctl.Status(sb.ControllerStatusRequest(sandbox_id="p1", verbose=True), timeout=10)
    assert status.info["exit_status"] == "" and not status.HasField("exited_at")
    wait = ctl.Wait.future(sb.ControllerWaitRequest(sandbox_id="p1"), timeout=10)
    ctl.Stop(sb.ControllerStopRequest(sandbox_id="p1"), timeout=10)
    assert wait.result().exit_status == 0


def test_bad_requests_get_clear_codes(controller):
    ctl, _ = controller
    ctl.Create(sb.ControllerCreateRequest(sandbox_id="p1"), timeout=10)
    assert code(lambda: ctl.Create(sb.ControllerCreateRequest(sandbox_id="p1"), timeout=10))[0] \
        == grpc.StatusCode.ALREADY_EXISTS
    for bad in ("", "../etc", "a/b", "-x"):
        got, details = code(lambda: ctl.Create(sb.ControllerCreateRequest(sandbox_id=bad), timeout=10))
        assert got == grpc.StatusCode.INVALID_ARGUMENT and "invalid sandbox id" in details
    for call, request in ((ctl.Start, sb.ControllerStartRequest), (ctl.Status, sb.ControllerStatusRequest),
                          (ctl.Wait, sb.ControllerWaitRequest), (ctl.Stop, sb.ControllerStopRequest),
                          (ctl.Shutdown, sb.ControllerShutdownRequest),
                          (ctl.Metrics, sb.ControllerMetricsRequest)):
        got, details = code(lambda: call(request(sandbox_id="ghost"), timeout=10))
        assert got == grpc.StatusCode.NOT_FOUND and "ghost" in details
    host_netns = sb.ControllerCreateRequest(sandbox_id="p3", netns_path="/proc/1/ns/net")
    got, details = code(lambda: ctl.Create(host_netns, timeout=10))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "netns_path '/proc/1/ns/net'" in details
    truncated = any_pb2.Any(type_url="type.googleapis.com/runtime.v1.PodSandboxConfig", value=b"\x12\x09abc")
    bad_options = sb.ControllerCreateRequest(sandbox_id="p2", options=truncated)
    got, details = code(lambda: ctl.Create(bad_options, timeout=10))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "PodSandboxConfig" in details


def test_start_without_an_image_fails_naming_it(controller):
    ctl, work = controller
    ctl.Create(sb.ControllerCreateRequest(sandbox_id="p1"), timeout=10)
    got, details = code(lambda: ctl.Start(sb.ControllerStartRequest(sandbox_id="p1"), timeout=30))
    assert got == grpc.StatusCode.FAILED_PRECONDITION
    assert f"{work}/no-kernel" in details
    # containerd forgets a sandbox whose Start failed and sends no Shutdown: nothing is left
    assert not (work / "state" / "p1").exists()
    assert code(lambda: ctl.Status(sb.ControllerStatusRequest(sandbox_id="p1"), timeout=10))[0] \
        == grpc.StatusCode.NOT_FOUND


def _resize(sandbox_id: str, resources, fields=("extensions",)) -> sb.ControllerUpdateRequest:
    """An Update carrying CRI's "updated-resources" extension (io.containerd.cri.v1.UpdatedResources,
    JSON as containerd's typeurl packs that Go type)."""
    request = sb.ControllerUpdateRequest(sandbox_id=sandbox_id, fields=list(fields))
    value = resources if isinstance(resources, bytes) \
        else json.dumps({"Overhead": None, "Resources": resources}).encode()
    request.sandbox.extensions["updated-resources"].CopyFrom(
        any_pb2.Any(type_url="io.containerd.cri.v1.UpdatedResources", value=value))
    return request


def test_update_accepts_the_record_and_checks_a_new_size(controller):
    """Default VM: 1 vCPU, 512 MiB; a pod with no resources of its own gets just that. Resizing a
    running VM: tests/vm/test_sandboxer_resize.py."""
    ctl, _ = controller
    ctl.Create(sb.ControllerCreateRequest(sandbox_id="p1"), metadata=NS, timeout=10)
    labels = sb.ControllerUpdateRequest(sandbox_id="p1", fields=["labels"])
    labels.sandbox.labels["team"] = "a"
    ctl.Update(labels, timeout=10)
    ctl.Update(_resize("p1", {"cpu_period": 100000, "cpu_quota": 50000}), timeout=10)  # still 1 vCPU
    ctl.Update(_resize("p1", {"memory_limit_in_bytes": 1 << 30}, fields=["labels"]), timeout=10)  # not asked
    got, details = code(lambda: ctl.Update(_resize("p1", {"cpu_period": 100000, "cpu_quota": 200000}), timeout=10))
    assert (got, details) == (grpc.StatusCode.FAILED_PRECONDITION,
                              "sandbox p1 is not running (created): only a running VM is resized")
    got, details = code(lambda: ctl.Update(_resize("p1", b"{not json"), timeout=10))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "updated-resources" in details
    assert code(lambda: ctl.Update(_resize("ghost", {}), timeout=10))[0] == grpc.StatusCode.NOT_FOUND
