"""Pod namespaces: after SetupSandbox with a shared PID namespace (its own agent: SetupSandbox
is once per agent), two containers see each other's processes and share the pod's hostname;
their specs' ipc/uts/pid entries were pointed at the pod's namespaces by the agent, and the
hostname each spec names is dropped (it would rename the pod); the pod's resolv.conf and hosts
are bound into both."""
import json
import os

from vmm_common.protos.kuasar import sandbox_pb2

POD_CONFIG = {"hostname": "podhost", "dns_config": {"servers": ["192.0.2.53"]},
              "linux": {"security_context": {"namespace_options": {"pid": "POD"}}}}


def test_two_containers_share_the_pod_pid_namespace(agent, bundles):
    sleeper = bundles.make(["sleep", "1000"])
    script = ("hostname; cat /etc/resolv.conf /etc/hosts > /tmp/files; "
              "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done")
    looker = bundles.make(["sh", "-c", script])
    out = looker.file("out")

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
        await t.remove(sleeper.id)
        return joined

    joined = agent.run(body)
    lines = out.read_text().splitlines()
    assert lines[0] == "podhost"                # though each spec named its own hostname
    assert "sleep 1000 " in lines[1:]           # the other container's process is visible
    spec = json.loads((sleeper.path / "config.json").read_text())
    paths = {ns["type"]: ns.get("path") for ns in spec["linux"]["namespaces"]}
    assert all(paths[kind] for kind in ("ipc", "uts", "pid")), paths
    assert "hostname" not in spec
    files = (looker.file("upper") / "tmp" / "files").read_text()  # the pod's, bound read-only
    assert "nameserver 192.0.2.53" in files and "podhost" in files
    assert joined == f"pid:[{os.stat(paths['pid']).st_ino}]"  # the pod's, not one of its own
    assert joined != os.readlink(f"/proc/{agent.pid}/ns/pid")
