"""Pod namespaces: after SetupSandbox with a shared PID namespace (its own agent: SetupSandbox
is once per agent), two containers see each other's processes and share the pod's hostname;
their specs' ipc/uts/pid entries were pointed at the pod's namespaces by the agent, and the
hostname each spec names is dropped (it would rename the pod); the pod's resolv.conf and hosts
are bound into both. The pod's PID 1 is pod-pause, which reaps the orphans the kernel gives it."""
import asyncio
import json
import os
import time

from initrd import pod_pause
from kernel.build import default_cache
from vmm_common.protos.kuasar import sandbox_pb2

KILLED_WITHIN_S = 5.0  # a SIGKILLed sleep is gone at once unless the machine is starved
POD_CONFIG = {"hostname": "podhost", "dns_config": {"servers": ["192.0.2.53"]},
              "linux": {"security_context": {"namespace_options": {"pid": "POD"}}}}


def test_two_containers_share_the_pod_pid_namespace(agent, bundles):
    sleeper = bundles.make(["sleep", "1000"])
    # an orphan (its parent sh exits at once) goes to the pod's PID 1; once killed it must be
    # reaped there, or its zombie's /proc entry would stay
    orphan = ("sh -c 'sleep 1000 >/dev/null 2>&1 & echo $!' > /tmp/orphan; read o < /tmp/orphan; "
              "grep PPid /proc/$o/status; kill $o; i=0; "
              "while [ -e /proc/$o ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; "
              "[ -e /proc/$o ] && echo not reaped || echo reaped; ")
    script = ("hostname; tr '\\0' ' ' < /proc/1/cmdline; echo; " + orphan +
              "cat /etc/resolv.conf /etc/hosts > /tmp/files; "
              "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done")
    looker = bundles.make(["sh", "-c", script])
    out = looker.file("out")
    # an init that exits leaving a process behind: with no PID namespace of its own, what it
    # left is killed before its exit is reported (as containerd's runc shim does)
    leaver = bundles.make(["sh", "-c", "sleep 1000 & echo $!"])
    left = leaver.file("out")

    async def body(t):
        request = sandbox_pb2.SetupSandboxRequest()
        request.config.type_url = "PodSandboxConfig"
        request.config.value = json.dumps(POD_CONFIG).encode()
        from google.protobuf import empty_pb2
        await t.client.call("grpc.SandboxService", "SetupSandbox", request, empty_pb2.Empty,
                            timeout=30)
        await t.create(sleeper)
        sleeper_pid = await t.start(sleeper.id)
        joined = os.readlink(f"/proc/{sleeper_pid}/ns/pid")
        assert await t.run_to_exit(looker, stdout=str(out)) == 0
        await t.delete(looker.id)
        assert await t.run_to_exit(leaver, stdout=str(left)) == 0
        left_alive = await _outlives(joined, int(left.read_text()), KILLED_WITHIN_S)
        await t.delete(leaver.id)
        await t.remove(sleeper.id)
        return joined, left_alive

    joined, left_alive = agent.run(body)
    assert not left_alive, f"the leaver's sleep lived on {KILLED_WITHIN_S} s after its Wait"
    lines = out.read_text().splitlines()
    assert lines[0] == "podhost"                # though each spec named its own hostname
    assert lines[1] == f"{pod_pause.build(default_cache())} 3 "  # PID 1: pod-pause, not a fork
    assert lines[2:4] == ["PPid:\t1", "reaped"]   # the orphan was pod-pause's, and reaped
    assert "sleep 1000 " in lines[1:]           # the other container's process is visible
    spec = json.loads((sleeper.path / "config.json").read_text())
    paths = {ns["type"]: ns.get("path") for ns in spec["linux"]["namespaces"]}
    assert all(paths[kind] for kind in ("ipc", "uts", "pid")), paths
    assert "hostname" not in spec
    files = (looker.file("upper") / "tmp" / "files").read_text()  # the pod's, bound read-only
    assert "nameserver 192.0.2.53" in files and "podhost" in files
    assert joined == f"pid:[{os.stat(paths['pid']).st_ino}]"  # the pod's, not one of its own
    assert joined != os.readlink(f"/proc/{agent.pid}/ns/pid")


async def _outlives(namespace: str, pid: int, seconds: float) -> bool:
    """Whether process `pid` of `namespace` is still alive `seconds` from now: the SIGKILL sent
    before the Wait answered (runc's kill --all, as the runc shim's) is delivered, not awaited."""
    deadline = time.monotonic() + seconds
    while _alive_in(namespace, pid):
        if time.monotonic() > deadline:
            return True
        await asyncio.sleep(0.02)
    return False


def _alive_in(namespace: str, pid: int) -> bool:
    """Whether process `pid` of the PID namespace `namespace` (`pid:[inode]`) lives, zombies aside."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") != namespace:
                continue
            status = open(f"/proc/{entry}/status").read()
        except OSError:  # gone meanwhile
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if fields["NSpid"].split()[-1] == str(pid) and not fields["State"].startswith("Z"):
            return True
    return False
