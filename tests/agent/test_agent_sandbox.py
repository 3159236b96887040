"""grpc.SandboxService and vmmtask.v1.Health of the real agent in dev mode
(`.venv/bin/vmm-task --listen unix://...`, root: conftest's Agent, one per `start_agent()`),
called over ttrpc as the host calls them."""

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from leak_guard import fail_if_left
from tests.agent.conftest import Agent
from vmm_common import ttrpc
from vmm_common.protos.kuasar import sandbox_pb2 as pb
from vmm_common.protos.vmmtask.v1 import health_pb2 as health_pb

SANDBOX = "grpc.SandboxService"
HEALTH = "vmmtask.v1.Health"
Code = ttrpc.Code

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="dev-mode agent tests run as root")


@pytest.fixture
def start_agent(tmp_path, runtime):
    """Start a fresh agent (conftest's Agent) per call; at the end each is stopped and what it
    did not undo fails the test."""
    started = []

    def start(*flags, wrapper=()):
        workdir = tmp_path / f"agent-{len(started)}"
        workdir.mkdir()
        started.append(Agent(workdir, runtime, *flags, wrapper=wrapper))
        return started[-1]

    yield start
    for left in [agent.stop() for agent in started]:
        fail_if_left(left)


def pod_config(**config) -> pb.SetupSandboxRequest:
    """Kuasar's form: type_url "PodSandboxConfig", the CRI config as JSON."""
    request = pb.SetupSandboxRequest()
    request.config.type_url = "PodSandboxConfig"
    request.config.value = json.dumps(config).encode()
    return request


def status(agent) -> health_pb.StatusResponse:
    return agent.call(HEALTH, "Status", empty_pb2.Empty(), health_pb.StatusResponse)


def test_ready_line_check_health_and_clean_stop(start_agent):
    agent = start_agent()
    ready = [line for line in agent.log.read_text().splitlines() if "vmm-task ready" in line]
    fields = dict(word.split("=") for word in ready[0].split() if "=" in word)
    started, main, ready_at = (float(fields[k].rstrip("s")) for k in ("started", "main", "ready"))
    assert len(ready) == 1 and 0 < started <= main <= ready_at
    assert int(fields["pid"]) == agent.pid and float(fields["rss"].rstrip("MB")) > 1
    agent.call(SANDBOX, "Check", pb.CheckRequest(), empty_pb2.Empty)
    version = agent.call(HEALTH, "Version", empty_pb2.Empty(), health_pb.VersionResponse)
    assert version.mode == "dev" and version.runtime.endswith(("crun", "runc"))
    check = agent.call(HEALTH, "Check", health_pb.HealthCheckRequest(service=SANDBOX),
                       health_pb.HealthCheckResponse)
    assert check.status == health_pb.HealthCheckResponse.SERVING
    unknown = agent.call(HEALTH, "Check", health_pb.HealthCheckRequest(service="no.Such"),
                         health_pb.HealthCheckResponse)
    assert unknown.status == health_pb.HealthCheckResponse.SERVICE_UNKNOWN
    sharefs = agent.call(HEALTH, "Check", health_pb.HealthCheckRequest(service="sharefs"),
                         health_pb.HealthCheckResponse)  # its state dir answers statfs
    assert (sharefs.status, sharefs.reason) == (health_pb.HealthCheckResponse.SERVING, "")
    state = status(agent)
    assert state.pid == agent.pid and state.rss_bytes > 1_000_000 and state.zombies == 0
    assert not agent.stop() and agent.exit_code == 0
    assert not agent.socket.exists()


def test_setup_sandbox_namespaces_dns_hosts_and_refusals(start_agent):
    agent = start_agent()
    bad = agent.error(SANDBOX, "SetupSandbox", pod_config(hostname="../../x"), empty_pb2.Empty)
    assert bad.code == Code.INVALID_ARGUMENT and "invalid hostname" in bad.message
    host_sysctl = agent.error(SANDBOX, "SetupSandbox", pod_config(
        linux={"sysctls": {"kernel.pid_max": "99999"}}), empty_pb2.Empty)
    assert host_sysctl.code == Code.FAILED_PRECONDITION and "kernel.pid_max" in host_sysctl.message
    unknown = agent.error(SANDBOX, "SetupSandbox", pod_config(
        hostname="web-0", linux={"sysctls": {"kernel.shm_no_such": "1"}}), empty_pb2.Empty)
    assert unknown.code == Code.INVALID_ARGUMENT
    assert "no sysctl kernel.shm_no_such" in unknown.message

    agent.call(SANDBOX, "SetupSandbox", pod_config(
        hostname="web-0",
        dns_config={"servers": ["10.96.0.10"], "searches": ["svc.cluster.local"]},
        linux={"sysctls": {"kernel.msgmax": "4321"},
               "security_context": {"namespace_options": {"pid": 0}}}), empty_pb2.Empty)
    ns = agent.run_dir / "sandbox-ns"
    assert sorted(os.listdir(ns)) == ["ipc", "pid", "uts"]
    in_uts = subprocess.run(["nsenter", f"--uts={ns}/uts", "hostname"], capture_output=True)
    assert in_uts.stdout == b"web-0\n"
    in_ipc = subprocess.run(["nsenter", f"--ipc={ns}/ipc", "cat", "/proc/sys/kernel/msgmax"],
                            capture_output=True)
    assert in_ipc.stdout == b"4321\n"
    pod = agent.run_dir / "pod"
    assert (pod / "resolv.conf").read_text() == "search svc.cluster.local\nnameserver 10.96.0.10\n"
    assert "127.0.1.1\tweb-0" in (pod / "hosts").read_text()

    again = agent.error(SANDBOX, "SetupSandbox", pod_config(), empty_pb2.Empty)
    assert again.code == Code.FAILED_PRECONDITION and "already" in again.message
    # dev mode in the host's network namespace must not touch the host's links
    net = agent.error(SANDBOX, "UpdateInterfaces", pb.UpdateInterfacesRequest(
        interfaces=[pb.Interface(hwAddr="02:00:00:00:00:01")]), empty_pb2.Empty)
    assert net.code == Code.FAILED_PRECONDITION and "--manage-network" in net.message

    assert not agent.stop() and agent.exit_code == 0
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(ns) not in mounts  # the pod namespace bind mounts went with the agent


def _userns(mode: str, mapping: dict | None = None) -> dict:
    options = {"mode": mode, "uids": [mapping] if mapping else [], "gids": [mapping] if mapping else []}
    return {"security_context": {"namespace_options": {"userns_options": options}}}


def test_setup_sandbox_without_pod_pause_is_an_error_naming_it(start_agent, tmp_path):
    """The pod's PID-namespace init missing: SetupSandbox fails naming it, the agent lives on,
    nothing of the pod is left, and a pod without a shared PID namespace needs no init."""
    missing = tmp_path / "no-pod-pause"
    agent = start_agent("--pod-pause", str(missing))
    failed = agent.error(SANDBOX, "SetupSandbox", pod_config(hostname="web-0"), empty_pb2.Empty)
    assert failed.code == Code.INTERNAL
    assert failed.message == (f"pod setup failed: [Errno 2] cannot run the pod's PID-namespace "
                              f"init {missing}: No such file or directory")
    assert os.listdir(agent.run_dir / "sandbox-ns") == []
    agent.call(SANDBOX, "SetupSandbox", pod_config(hostname="web-0", linux={
        "security_context": {"namespace_options": {"pid": 1}}}), empty_pb2.Empty)  # CONTAINER
    assert sorted(os.listdir(agent.run_dir / "sandbox-ns")) == ["ipc", "uts"]
    assert not agent.stop() and agent.exit_code == 0


def test_setup_sandbox_refuses_user_namespaces_as_a_runc_pod_is_refused(start_agent):
    # the three critest "UserNamespaces" specs a runc pod fails and ours did not (cri-tools
    # pkg/validate/security_context_linux.go): refused before anything of the pod is made
    agent = start_agent()
    root_unmapped = {"container_id": 1, "host_id": 1000, "length": 100000}
    for linux, refusal in (
            (_userns("CONTAINER"), 'unsupported user namespace mode: "CONTAINER"'),
            (_userns("TARGET"), 'unsupported user namespace mode: "TARGET"'),
            (_userns("POD", root_unmapped), "user namespaces enabled, but no mapping found for uid 0")):
        refused = agent.error(SANDBOX, "SetupSandbox", pod_config(hostname="web-0", linux=linux),
                              empty_pb2.Empty)
        assert (refused.code, refused.message.endswith(refusal)) == (Code.INVALID_ARGUMENT, True), refused
        assert not (agent.run_dir / "sandbox-ns").exists() or not os.listdir(agent.run_dir / "sandbox-ns")
    agent.call(SANDBOX, "SetupSandbox", pod_config(hostname="web-0", linux=_userns("NODE")),
               empty_pb2.Empty)
    assert sorted(os.listdir(agent.run_dir / "sandbox-ns")) == ["ipc", "pid", "uts"]
    assert not agent.stop() and agent.exit_code == 0


def test_sync_clock_first_step_and_dev_mode_refuses_to_set_the_host_clock(start_agent):
    agent = start_agent()
    sent = time.time_ns()
    reply = agent.call(SANDBOX, "SyncClock", pb.SyncClockPacket(ClientSendTime=sent),
                       pb.SyncClockPacket)
    assert reply.ClientSendTime == sent
    assert sent <= reply.ClientArriveTime <= reply.ServerSendTime <= time.time_ns()
    refused = agent.error(SANDBOX, "SyncClock", pb.SyncClockPacket(Delta=-1000),
                          pb.SyncClockPacket)
    assert refused.code == Code.FAILED_PRECONDITION and "host's clock" in refused.message


def test_exec_vm_process_needs_debug(start_agent):
    agent = start_agent()
    denied = agent.error(SANDBOX, "ExecVMProcess", pb.ExecVMProcessRequest(command="true"),
                         pb.ExecVMProcessResponse)
    assert denied.code == Code.PERMISSION_DENIED and "task.debug" in denied.message


def test_exec_vm_process_and_its_orphan_is_reaped(start_agent):
    agent = start_agent("--debug")
    echo = agent.call(SANDBOX, "ExecVMProcess",
                      pb.ExecVMProcessRequest(command="cat; echo done", stdin=b"in "),
                      pb.ExecVMProcessResponse)
    assert echo.out == "in done\n"
    failed = agent.error(SANDBOX, "ExecVMProcess",
                         pb.ExecVMProcessRequest(command="echo broken >&2; exit 4"),
                         pb.ExecVMProcessResponse)
    assert failed.code == Code.UNKNOWN and "exited with 4" in failed.message
    assert "broken" in failed.message

    reaped_before = status(agent).reaped_total
    orphan = int(agent.call(SANDBOX, "ExecVMProcess",
                            pb.ExecVMProcessRequest(command="sleep 30 & echo $!"),
                            pb.ExecVMProcessResponse).out)
    parent = Path(f"/proc/{orphan}/stat").read_bytes().rsplit(b")", 1)[1].split()[1]
    assert int(parent) == agent.pid  # re-parented to the agent (child-subreaper)
    os.kill(orphan, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{orphan}").exists():  # a zombie would keep its /proc entry
        assert time.monotonic() < deadline, "orphan left as a zombie"
        time.sleep(0.05)
    after = status(agent)
    assert after.zombies == 0 and after.reaped_total >= reaped_before + 2


def test_update_interfaces_and_routes_in_the_agents_own_network_namespace(start_agent):
    agent = start_agent("--manage-network", wrapper=("unshare", "--net"))
    in_agent_net = ["nsenter", "-t", str(agent.pid), "-n"]
    subprocess.run([*in_agent_net, "ip", "link", "add", "eth0", "address", "02:00:00:00:aa:01",
                    "type", "veth", "peer", "name", "peer0"], check=True)
    agent.call(SANDBOX, "UpdateInterfaces", pb.UpdateInterfacesRequest(interfaces=[
        pb.Interface(name="pod0", hwAddr="02:00:00:00:aa:01", mtu=1450, IPAddresses=[
            pb.IPAddress(address="192.168.77.2", mask="24")])]), empty_pb2.Empty)
    agent.call(SANDBOX, "UpdateRoutes", pb.UpdateRoutesRequest(routes=[
        pb.Route(dest="default", gateway="192.168.77.1", device="pod0")]), empty_pb2.Empty)
    link = json.loads(subprocess.run([*in_agent_net, "ip", "-j", "addr", "show", "pod0"],
                                     capture_output=True, check=True).stdout)[0]
    assert link["mtu"] == 1450 and "UP" in link["flags"]
    assert {"192.168.77.2/24"} <= {f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"]}
    routes = subprocess.run([*in_agent_net, "ip", "route"], capture_output=True, text=True).stdout
    assert "default via 192.168.77.1 dev pod0" in routes
    missing = agent.error(SANDBOX, "UpdateInterfaces", pb.UpdateInterfacesRequest(
        interfaces=[pb.Interface(hwAddr="02:00:00:00:00:99")]), empty_pb2.Empty)
    assert missing.code == Code.NOT_FOUND and "02:00:00:00:00:99" in missing.message

    # a SetupSandbox whose network part fails leaves nothing behind and may be retried
    failed = pod_config(hostname="web-1")
    failed.interfaces.add(hwAddr="02:00:00:00:00:99")
    assert agent.error(SANDBOX, "SetupSandbox", failed, empty_pb2.Empty).code == Code.NOT_FOUND
    assert os.listdir(agent.run_dir / "sandbox-ns") == []
    agent.call(SANDBOX, "SetupSandbox", pod_config(hostname="web-1"), empty_pb2.Empty)
    assert sorted(os.listdir(agent.run_dir / "sandbox-ns")) == ["ipc", "pid", "uts"]


def test_debug_console_exec_mode_and_interactive(start_agent, tmp_path):
    """Kuasar's debug console (vsock://1025 with task.debug; here --debug-console): a shell on
    a pty per connection; `KSR_MODE exec` first turns echo off."""
    console = tmp_path / "console.sock"
    agent = start_agent(f"--debug-console=unix://{console}")

    async def session(sent: bytes) -> str:
        reader, writer = await asyncio.open_unix_connection(str(console))
        writer.write(sent)
        try:
            return (await asyncio.wait_for(reader.read(), 20)).decode(errors="replace")
        finally:
            writer.close()

    quiet = asyncio.run(session(b"KSR_MODE exec\necho $((6*7)); exit\n"))
    assert "42" in quiet.split() and "6*7" not in quiet, quiet
    chatty = asyncio.run(session(b"echo $((6*7)); exit\n"))
    assert "42" in chatty.split() and "echo $((6*7))" in chatty, chatty  # the pty echoes
    assert status(agent).zombies == 0
    assert not agent.stop() and agent.exit_code == 0
    assert not console.exists()
