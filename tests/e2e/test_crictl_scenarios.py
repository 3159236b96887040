"""What a node does with pods, through the real containerd 2.4 and crictl, on containerd's own
runc runtime (the baseline) and on this project's `vmm` runtime in the same run: every scenario
is parametrised over both, and those marked `stdio` also over `vmm-streaming` (conftest.py), on
one node shared by the module (node.py)."""
from __future__ import annotations

import concurrent.futures
import ipaddress
import itertools
import json
import os
import subprocess
import threading
import time

import pytest

import stand_in_images
import tools
from bench.sandboxer import pss_kb
from containerd_node import POD_SUBNET
from crictl import CrictlError
from leak_guard import mounts_left
from pods import wait_for
from terminal import run_in_terminal

if (reason := tools.skip_reason()) is not None:
    pytest.skip(reason, allow_module_level=True)

WEB = stand_in_images.WEB_SERVER.name
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


@pytest.mark.stdio
def test_logs_keep_stdout_and_stderr_apart_exactly(node, pods):
    pod = pods.run("logs")
    cid = pod.container("talk", ["sh", "-c", "echo out1; echo err1 >&2; echo; printf 'out2 \\303\\251\\t|\\n'; "
                                             "echo err2 >&2; exit 0"])
    assert pod.wait_exited(cid)["exitCode"] == 0
    logs = node.crictl.logs(cid)
    assert (logs.stdout, logs.stderr) == (b"out1\n\nout2 \xc3\xa9\t|\n", b"err1\nerr2\n")


@pytest.mark.stdio
def test_logs_of_many_lines_are_complete(node, pods):
    pod = pods.run("many-lines")
    cid = pod.container("seq", ["sh", "-c", "seq 1 100000; seq 100001 120000 >&2"])
    assert pod.wait_exited(cid, timeout=120)["exitCode"] == 0
    logs = node.crictl.logs(cid)
    assert logs.stdout == lines(1, 100000)
    assert logs.stderr == lines(100001, 120000)


@pytest.mark.stdio
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


@pytest.mark.stdio
def test_exec_output_of_100k_lines_is_exact(node, pods):
    pod = pods.run("exec-lines")
    cid = pod.container("idle", ["sleep", "3600"])
    result = node.crictl.exec(cid, "sh", "-c", "seq 1 100000; seq 1 1000 >&2", check=True)
    assert result.stdout == lines(1, 100000)
    assert result.stderr == lines(1, 1000)


@pytest.mark.stdio
def test_exec_stdin_reaches_the_process(node, pods):
    pod = pods.run("exec-stdin")
    cid = pod.container("idle", ["sleep", "3600"])
    data = os.urandom(1 << 20)
    assert node.crictl.exec(cid, "cat", input=data, check=True).stdout == data
    counted = node.crictl.exec(cid, "wc", "-c", input=data, check=True)
    assert counted.stdout.split() == [b"%d" % len(data)]


@pytest.mark.stdio
def test_exec_with_a_terminal(node, pods):
    pod = pods.run("exec-tty")
    cid = pod.container("idle", ["sleep", "3600"])
    status, shown = run_in_terminal(node.crictl.argv("exec", "-it", cid, "sh"),
                                    [b"stty size; tty; echo $((6*7))\r", b"exit\r"], rows=33, cols=77)
    assert status == 0, shown
    assert b"33 77" in shown and b"/dev/pts/" in shown and b"\r\n42\r\n" in shown, shown


@pytest.mark.stdio
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


@pytest.mark.stdio
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


@pytest.mark.stdio
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

CRI_RECOVERY_S = 30.0  # containerd's CRI must have recovered every pod this soon after its start
ECHO = ["sh", "-c", 'while read l; do echo "got $l"; done']

# What a restart step does to the node; vmm-sandboxer's `stop` is SIGTERM (a graceful stop, as an
# upgrade does), its `kill` is kill -9 (a crash); `containerd launch` starts containerd without
# waiting, `containerd ready` waits for its CRI.
STEPS = {
    "containerd stop": lambda node: node.containerd.stop(),
    "containerd start": lambda node: node.containerd.start(CRI_RECOVERY_S),
    "containerd launch": lambda node: node.containerd.launch(),
    "containerd ready": lambda node: wait_for(node.containerd.serves_cri, "containerd's CRI", CRI_RECOVERY_S),
    "sandboxer kill": lambda node: node.sandboxer.kill(),
    "sandboxer stop": lambda node: node.sandboxer.stop(),
    "sandboxer start": lambda node: node.sandboxer.start(),
}
# Issue 12's matrix: each restart, and both in either order or together, as steps in order.
RESTARTS = {
    "containerd": ("containerd stop", "containerd start"),
    "sandboxer_killed": ("sandboxer kill", "sandboxer start"),
    "sandboxer_upgraded": ("sandboxer stop", "sandboxer start"),
    "containerd_then_sandboxer": ("containerd stop", "containerd start", "sandboxer kill", "sandboxer start"),
    "sandboxer_then_containerd": ("sandboxer kill", "sandboxer start", "containerd stop", "containerd start"),
    "both_down_at_once": ("sandboxer kill", "containerd stop", "containerd launch", "sandboxer start",
                          "containerd ready"),
}


@pytest.mark.node_restart
@pytest.mark.stdio
@pytest.mark.parametrize("restart", list(RESTARTS))
def test_pods_survive_restart(node, pods, restart):
    """A pod with a counting container and one echoing its stdin goes through `restart`; then
    containerd lists the pod ready and both containers running, exec answers, a line sent by
    attach reaches the echo container's stdin, both logs go on with no line lost or repeated,
    stop works and removing the pod leaves nothing. On runc: the baseline, whose pods the
    sandboxer's restarts do not touch."""
    before = node_leftovers(node)
    pod = pods.run(restart.replace("_", "-"))
    counter = pod.container("counter", COUNTER)
    echo = pod.container("echo", ECHO, stdin=True)
    wait_for(lambda: node.crictl.logs(counter).stdout.count(b"\n") > 3, "the counter's first lines")
    send_line(node, echo, b"before")
    for step in RESTARTS[restart]:
        STEPS[step](node)
    # containerd reconnects to a restarted daemon's Controller with a backoff (docs/restarts.md),
    # as kubelet retries a failed status call: the pod must be READY within CRI_RECOVERY_S
    wait_for(lambda: node.crictl.inspectp(pod.id, verbose=False)["status"]["state"] == "SANDBOX_READY",
             "the pod READY", CRI_RECOVERY_S)
    listed = json.loads(node.crictl.run("ps", "-o", "json", "--pod", pod.id).stdout)["containers"]
    assert sorted((c["id"], c["state"]) for c in listed) == \
        sorted((cid, "CONTAINER_RUNNING") for cid in (counter, echo))
    assert node.crictl.exec(counter, "echo", "alive", check=True).stdout == b"alive\n"
    send_line(node, echo, b"after")
    assert node.crictl.logs(echo).stdout == b"got before\ngot after\n"
    seen = node.crictl.logs(counter).stdout.count(b"\n")
    wait_for(lambda: node.crictl.logs(counter).stdout.count(b"\n") > seen + 5, "the counter going on")
    counted = [int(line) for line in node.crictl.logs(counter).stdout.split(b"\n")[:-1]]
    gaps = [(a + 1, b - 1) for a, b in zip(counted, counted[1:]) if b != a + 1]
    if pods.runtime == "vmm-streaming" and "containerd stop" in RESTARTS[restart]:
        # containerd's Streaming protocol acknowledges nothing: what was in flight to the stopped
        # containerd is lost with it (docs/stdio.md), one run of lines per stop at most; nothing
        # may repeat or come out of order
        assert counted[0] == 0 and all(b > a for a, b in zip(counted, counted[1:])), counted
        assert len(gaps) <= RESTARTS[restart].count("containerd stop"), f"lines lost: {gaps}"
    else:
        assert counted == list(range(len(counted))), f"lines lost: {gaps}"
    node.crictl.stop(counter, timeout_s=2)
    assert node.crictl.state(counter) == "CONTAINER_EXITED"
    pods.remove(pod)
    after = node_leftovers(node)
    assert {kind: sorted(set(after[kind]) - set(before[kind])) for kind in after} == \
        {"processes": [], "mounts": [], "taps": [], "pod_dirs": []}


def send_line(node, cid: str, line: bytes) -> None:
    """`crictl attach -i` to the container, send `line` on its stdin and see the container's
    echo of it both in attach's output and in its log; then detach (the container's stdin stays
    open: not stdin_once)."""
    attach = node.crictl.popen("attach", "-i", cid, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    shown = bytearray()

    def read_output() -> None:
        while chunk := attach.stdout.read1(4096):
            shown.extend(chunk)

    reader = threading.Thread(target=read_output)
    reader.start()
    echoed = b"got %s\n" % line
    try:
        attach.stdin.write(line + b"\n")
        attach.stdin.flush()
        wait_for(lambda: (echoed in shown and echoed in node.crictl.logs(cid).stdout) or attach.poll() is not None,
                 f"{line!r} echoed through attach (shown: {bytes(shown)!r})")
        assert attach.poll() is None, f"crictl attach exited {attach.returncode}: {bytes(shown)!r}"
    finally:
        attach.kill()
        attach.wait(30)
        reader.join(30)


@pytest.mark.node_restart
def test_cri_ready_after_containerd_restart_with_5_pods(node, pods, runtime, figures):
    """Issue 12's closing figures: seconds from containerd's start until its CRI serves again
    (it has recovered every pod), with 5 pods each running a container; and the Pss of what
    carries pods across restarts with 1 and with 5 such pods (restart_pss_kb: the relay runs
    from the first pod to the last, so per pod is the difference over 4, per node the rest)."""
    first = pods.run("five-0")
    cids = [first.container("idle", ["sleep", "3600"])]
    pss = {"1_pod": restart_pss_kb(node, runtime)}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        others = list(pool.map(lambda i: pods.run(f"five-{i}"), range(1, 5)))
    cids += [pod.container("idle", ["sleep", "3600"]) for pod in others]
    pss["5_pods"] = restart_pss_kb(node, runtime)
    node.containerd.stop()
    begin = time.monotonic()
    node.containerd.start(CRI_RECOVERY_S)
    ready_s = time.monotonic() - begin
    assert [node.crictl.state(cid) for cid in cids] == ["CONTAINER_RUNNING"] * 5
    figures[f"containerd_restart_with_5_pods.{runtime}"] = {"cri_ready_s": round(ready_s, 2), "pss_kb": pss}


def restart_pss_kb(node, runtime: str) -> dict:
    """Pss (kB, /proc/PID/smaps_rollup) of what keeps pods running and reachable across restarts.
    vmm: the task relay (one per node), the stdio keepers (one per container stream) and, for
    scale, the daemon; runc: containerd's shims (one per pod)."""
    running = node_processes(node)

    def named(name: str) -> int:
        # a keeper's argv[0] is "vmm-stdio-keeper <mark path>", a shim's may be a path
        return sum(pss_kb(pid) for pid, argv in running.items()
                   if argv[0] and os.path.basename(argv[0].split()[0]) == name)

    if runtime == "runc":
        return {"runc_shims": named("containerd-shim-runc-v2")}
    return {"task_relay": pss_kb(node.sandboxer.relay_pid()), "stdio_keepers": named("vmm-stdio-keeper"),
            "daemon": pss_kb(node.sandboxer.pid)}


def node_processes(node) -> dict[int, list[str]]:
    """pid -> argv of the processes naming the node's directories, the node's services and this
    test process left out: what pods run on the host (shims, QEMU, virtiofsd, stdio keepers)."""
    services = {s.proc.pid for s in (node.registry.service, node.containerd.service, node.sandboxer.service)}
    markers = [str(node.work) + "/", str(node.sandboxer_dir) + "/"]
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace").split("\0")[:-1]
        except OSError:
            continue
        if any(m in arg for arg in argv for m in markers) and int(entry) not in services | {os.getpid()}:
            found[int(entry)] = argv
    return found


def node_leftovers(node) -> dict:
    """What pods may leave on the node: their processes (node_processes), mounts under its
    directories (rootfs, shared dirs, pod network namespaces), taps in its namespace, pod
    directories of the sandboxer."""
    processes = [f"{pid}: {' '.join(argv)[:200]}" for pid, argv in node_processes(node).items()]
    taps = subprocess.run(["ip", "-n", node.netns.name, "-o", "link", "show", "type", "tun"],
                          capture_output=True, text=True).stdout.splitlines()
    return {"processes": processes, "mounts": mounts_left(node.work) + mounts_left(node.sandboxer_dir),
            "taps": taps, "pod_dirs": sorted(p.name for p in node.sandboxer_dir.iterdir() if p.is_dir())}
