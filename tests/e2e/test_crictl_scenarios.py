"""What a node does with pods, through the real containerd 2.4 and crictl, on containerd's own
runc runtime (the baseline) and on this project's `vmm` runtime in the same run: every scenario
is parametrised over both (conftest.RUNTIMES), on one node shared by the module (node.py)."""
from __future__ import annotations

import ipaddress
import itertools
import os
import subprocess

import pytest

import stand_in_images
import tools
from leak_guard import mounts_left
from containerd_node import POD_SUBNET
from crictl import CrictlError
from pods import wait_for
from terminal import run_in_terminal

if (reason := tools.skip_reason()) is not None:
    pytest.skip(reason, allow_module_level=True)

WEB = stand_in_images.WEB_SERVER.name
RESTART_RUNTIMES = ["runc", "vmm"]  # issue 12: both restarts pass on vmm too (docs/restarts.md)
forward_ports = itertools.count(18080)
COUNTER = ["sh", "-c", "i=0; while :; do echo $i; i=$((i+1)); sleep 0.2; done"]


def lines(first: int, last: int) -> bytes:
    return b"".join(b"%d\n" % n for n in range(first, last + 1))


def test_http_server_reachable_at_pod_ip(node, pods):
    pod = pods.run("web")
    pod.container("web", image=WEB)
    ip = pod.ip
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(POD_SUBNET)
    page = wait_for(lambda: node.netns.fetch(f"http://{ip}/", timeout=5), f"the web page at {ip}:80")
    assert page == stand_in_images.WEB_PAGE


def test_logs_keep_stdout_and_stderr_apart_exactly(node, pods):
    pod = pods.run("logs")
    cid = pod.container("talk", ["sh", "-c", "echo out1; echo err1 >&2; echo; printf 'out2 \\303\\251\\t|\\n'; "
                                             "echo err2 >&2; exit 0"])
    assert pod.wait_exited(cid)["exitCode"] == 0
    logs = node.crictl.logs(cid)
    assert (logs.stdout, logs.stderr) == (b"out1\n\nout2 \xc3\xa9\t|\n", b"err1\nerr2\n")


def test_logs_of_many_lines_are_complete(node, pods):
    pod = pods.run("many-lines")
    cid = pod.container("seq", ["sh", "-c", "seq 1 100000; seq 100001 120000 >&2"])
    assert pod.wait_exited(cid, timeout=120)["exitCode"] == 0
    logs = node.crictl.logs(cid)
    assert logs.stdout == lines(1, 100000)
    assert logs.stderr == lines(100001, 120000)


def test_exec_exit_codes(node, pods):
    pod = pods.run("exec-codes")
    cid = pod.container("idle", ["sleep", "3600"])
    synced = node.crictl.exec_sync(cid, "sh", "-c", "exit 3")  # crictl itself exits 1
    assert synced.returncode == 1 and b"'sh -c exit 3' exited with 3" in synced.stderr, synced.stderr
    assert node.crictl.exec_sync(cid, "true").returncode == 0
    streamed = node.crictl.exec(cid, "sh", "-c", "echo before; exit 5")
    assert streamed.stdout == b"before\n"
    assert streamed.returncode != 0 and b"exit code 5" in streamed.stderr, streamed.stderr
    missing = node.crictl.exec(cid, "/no/such/binary")
    assert missing.returncode != 0 and b"/no/such/binary" in missing.stderr, missing.stderr


def test_exec_output_of_100k_lines_is_exact(node, pods):
    pod = pods.run("exec-lines")
    cid = pod.container("idle", ["sleep", "3600"])
    result = node.crictl.exec(cid, "sh", "-c", "seq 1 100000; seq 1 1000 >&2", check=True)
    assert result.stdout == lines(1, 100000)
    assert result.stderr == lines(1, 1000)


def test_exec_stdin_reaches_the_process(node, pods):
    pod = pods.run("exec-stdin")
    cid = pod.container("idle", ["sleep", "3600"])
    data = os.urandom(1 << 20)
    assert node.crictl.exec(cid, "cat", input=data, check=True).stdout == data
    counted = node.crictl.exec(cid, "wc", "-c", input=data, check=True)
    assert counted.stdout.split() == [b"%d" % len(data)]


def test_exec_with_a_terminal(node, pods):
    pod = pods.run("exec-tty")
    cid = pod.container("idle", ["sleep", "3600"])
    status, shown = run_in_terminal(node.crictl.argv("exec", "-it", cid, "sh"),
                                    [b"stty size; tty; echo $((6*7))\r", b"exit\r"], rows=33, cols=77)
    assert status == 0, shown
    assert b"33 77" in shown and b"/dev/pts/" in shown and b"\r\n42\r\n" in shown, shown


def test_attach_to_a_container_stdin_and_stdout(node, pods):
    pod = pods.run("attach")
    cid = pod.container("reader", ["sh", "-c", 'while read l; do echo "got $l"; done; echo bye'],
                        stdin=True, stdin_once=True)
    attached = node.crictl.run("attach", "-i", cid, input=b"one\ntwo\n", timeout=120)
    assert attached.stdout == b"got one\ngot two\nbye\n", attached.stderr
    assert pod.wait_exited(cid)["exitCode"] == 0
    assert node.crictl.logs(cid).stdout == b"got one\ngot two\nbye\n"


def test_port_forward_to_the_pod(node, pods):
    pod = pods.run("forward")
    pod.container("web", image=WEB)
    port = next(forward_ports)
    forward = node.crictl.popen("port-forward", pod.id, f"{port}:80", stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
    try:
        page = wait_for(lambda: node.netns.fetch(f"http://127.0.0.1:{port}/", timeout=5),
                        f"the web page through crictl port-forward {port}:80", timeout=30)
        assert page == stand_in_images.WEB_PAGE
    finally:
        forward.terminate()
        forward.wait(10)


def test_stats_of_a_running_container(node, pods):
    pod = pods.run("stats")
    cid = pod.container("busy", ["sh", "-c", "head -c 8000000 /dev/zero > /tmp/filled; sleep 3600"])

    def sample():
        stats = node.crictl.stats(cid)["stats"]
        return stats and int(stats[0]["cpu"]["usageCoreNanoSeconds"]["value"]) > 0 and \
            int(stats[0]["memory"]["workingSetBytes"]["value"]) > 0 and stats[0]

    stats = wait_for(sample, "crictl stats with CPU and memory figures")
    assert stats["attributes"]["id"] == cid


def test_several_containers_share_one_pod(node, pods):
    pod = pods.run("multi")
    web = pod.container("web", image=WEB)
    client = pod.container("client", ["sh", "-c", "until printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc 127.0.0.1 80 "
                                                  "> /tmp/page; do sleep 0.2; done; grep -o 'Welcome to nginx!' /tmp/page"])
    namer = pod.container("namer", ["hostname"])
    assert pod.wait_exited(client)["exitCode"] == 0
    assert pod.wait_exited(namer)["exitCode"] == 0
    assert node.crictl.logs(client).stdout == b"Welcome to nginx!\n"
    assert node.crictl.logs(namer).stdout == pod.config["hostname"].encode() + b"\n"
    listed = node.crictl.run("ps", "-a", "-q", "--pod", pod.id).stdout.decode().split()
    assert sorted(listed) == sorted([web, client, namer])
    assert node.crictl.state(web) == "CONTAINER_RUNNING"


def test_exit_codes_and_reasons(node, pods):
    pod = pods.run("exits")
    commands = {"zero": ("exit 0", 0, "Completed"), "one": ("exit 1", 1, "Error"),
                "fortytwo": ("exit 42", 42, "Error"), "killed": ("kill -9 $$", 137, "Error")}
    ids = {name: pod.container(name, ["sh", "-c", command]) for name, (command, _, _) in commands.items()}
    got = {name: pod.wait_exited(cid) for name, cid in ids.items()}
    assert {name: (s["exitCode"], s["reason"]) for name, s in got.items()} == \
        {name: (code, reason) for name, (_, code, reason) in commands.items()}


def test_out_of_memory_is_reported(node, pods):
    pod = pods.run("oom")
    limit = 32 << 20
    cid = pod.container("hog", ["dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"],
                        linux={"resources": {"memory_limit_in_bytes": limit, "memory_swap_limit_in_bytes": limit}})
    status = pod.wait_exited(cid)
    assert (status["reason"], status["exitCode"]) == ("OOMKilled", 137)


def test_inspect_output_is_readable(node, pods, runtime):
    pod = pods.run("inspect")
    cid = pod.container("idle", ["sleep", "3600"])
    sandbox = node.crictl.inspectp(pod.id)
    assert sandbox["status"]["id"] == pod.id
    assert sandbox["status"]["state"] == "SANDBOX_READY"
    assert sandbox["status"]["metadata"]["name"] == pod.config["metadata"]["name"]
    assert ipaddress.ip_address(sandbox["status"]["network"]["ip"]) in ipaddress.ip_network(POD_SUBNET)
    assert sandbox["status"]["runtimeHandler"] == runtime
    container = node.crictl.inspect(cid)
    assert container["status"]["id"] == cid
    assert container["status"]["state"] == "CONTAINER_RUNNING"
    assert container["status"]["image"]["image"] == stand_in_images.BUSYBOX.name
    assert container["info"]["sandboxID"] == pod.id


def test_bad_requests_get_clear_errors(node, pods):
    with pytest.raises(CrictlError, match="not found"):
        node.crictl.inspectp("0" * 64)
    pod = pods.run("bad")
    done = pod.container("done", ["true"])
    pod.wait_exited(done)
    exec_exited = node.crictl.exec_sync(done, "true")
    assert exec_exited.returncode != 0 and b"container is in CONTAINER_EXITED state" in exec_exited.stderr, \
        exec_exited.stderr
    node.crictl.stopp(pod.id)
    with pytest.raises(CrictlError) as late:
        pod.container("late", ["true"])
    assert pod.id in late.value.stderr and "not running" in late.value.stderr, late.value.stderr


def test_unknown_runtime_handler_is_refused(node):
    with pytest.raises(CrictlError, match=r'no runtime for \\?"nosuch\\?" is configured'):
        node.crictl.runp(node.crictl.pod_config("nosuch"), "nosuch")


def test_stop_running_containers(node, pods):
    """kubelet's container stop: SIGTERM, then SIGKILL once the grace period is over; then
    remove. One container ends on SIGTERM, the other ignores it and is killed."""
    pod = pods.run("stop")
    polite = pod.container("polite", ["sleep", "3600"])
    stubborn = pod.container("stubborn", ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done"])
    wait_for(lambda: node.crictl.logs(stubborn).stdout == b"ready\n", "the stubborn container's trap")
    node.crictl.stop(polite, timeout_s=30)
    node.crictl.stop(stubborn, timeout_s=2)
    assert [(s["state"], s["exitCode"]) for s in map(lambda c: node.crictl.inspect(c)["status"], (polite, stubborn))] \
        == [("CONTAINER_EXITED", 143), ("CONTAINER_EXITED", 137)]
    for cid in (polite, stubborn):
        node.crictl.rm(cid)
        pod.containers.remove(cid)
    assert node.crictl.run("ps", "-a", "-q", "--pod", pod.id).stdout == b""


def test_stop_and_remove_leave_nothing(node, pods):
    before = node_leftovers(node)
    pod = pods.run("leaves-nothing")
    pod.container("web", image=WEB)
    cid = pod.container("idle", ["sleep", "3600"])
    assert node.crictl.exec(cid, "echo", "x", check=True).stdout == b"x\n"
    pods.remove(pod)
    after = node_leftovers(node)
    assert {kind: sorted(set(after[kind]) - set(before[kind])) for kind in after} == \
        {"processes": [], "mounts": [], "taps": [], "pod_dirs": []}


# Restarts run after every other scenario, the baseline's first (conftest.py orders them): a
# runtime that does not survive one may leave containerd unable to recover its pods.


@pytest.mark.node_restart
@pytest.mark.parametrize("runtime", RESTART_RUNTIMES, indirect=True)
def test_sandboxer_killed_and_restarted_keeps_pods(node, pods):
    """vmm-sandboxer dies (kill -9) and comes back on its --dir; on runc this checks that the
    baseline's pods are untouched by it."""
    assert_pods_survive(node, pods, "vmm-restart", node.sandboxer.kill_and_restart)


@pytest.mark.node_restart
@pytest.mark.parametrize("runtime", RESTART_RUNTIMES, indirect=True)
def test_containerd_restart_keeps_pods(node, pods):
    assert_pods_survive(node, pods, "ctd-restart", node.containerd.restart)


def assert_pods_survive(node, pods, name: str, restart) -> None:
    """A pod with a counting container, `restart()`, then: the pod is ready, the container runs,
    answers exec, its log goes on from where it was (no line lost or repeated), and the pod can
    be removed."""
    pod = pods.run(name)
    cid = pod.container("counter", COUNTER)
    wait_for(lambda: node.crictl.logs(cid).stdout.count(b"\n") > 3, "the counter's first lines")
    restart()
    assert node.crictl.inspectp(pod.id, verbose=False)["status"]["state"] == "SANDBOX_READY"
    assert node.crictl.state(cid) == "CONTAINER_RUNNING"
    assert node.crictl.exec(cid, "echo", "alive", check=True).stdout == b"alive\n"
    seen = node.crictl.logs(cid).stdout.count(b"\n")
    wait_for(lambda: node.crictl.logs(cid).stdout.count(b"\n") > seen + 5, "the counter going on")
    out = node.crictl.logs(cid).stdout.split(b"\n")[:-1]
    assert out == [b"%d" % n for n in range(len(out))]
    pods.remove(pod)


def node_leftovers(node) -> dict:
    """What pods may leave on the node: processes naming the node's directories besides its own
    services (shims, QEMU, virtiofsd, stdio keepers), mounts under them (rootfs, shared dirs,
    pod network namespaces), taps in its namespace, pod directories of the sandboxer."""
    services = {s.proc.pid for s in (node.registry.service, node.containerd.service, node.sandboxer.service)}
    markers = [str(node.work) + "/", str(node.sandboxer_dir) + "/"]
    processes = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(m in cmdline for m in markers) and int(entry) not in services | {os.getpid()}:
            processes.append(f"{entry}: {cmdline[:200]}")
    taps = subprocess.run(["ip", "-n", node.netns.name, "-o", "link", "show", "type", "tun"],
                          capture_output=True, text=True).stdout.splitlines()
    return {"processes": processes, "mounts": mounts_left(node.work) + mounts_left(node.sandboxer_dir),
            "taps": taps, "pod_dirs": sorted(p.name for p in node.sandboxer_dir.iterdir() if p.is_dir())}
