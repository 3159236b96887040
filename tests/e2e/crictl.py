"""crictl, the CRI client a node's operator uses, against the e2e node's containerd: the pod and
container configs are JSON the test writes (CRI's PodSandboxConfig / ContainerConfig), and
every call runs inside the node's network namespace (exec, attach and port-forward reach
containerd's streaming server on its 127.0.0.1)."""
from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import tools
from netns import NodeNetns

# RunPodSandbox boots a VM under TCG on a loaded machine: crictl's per-call deadline is this.
CALL_TIMEOUT_S = 180

# crictl links moby/spdystream, which prints every stream frame into exec/attach output when
# DEBUG is set at all (even DEBUG=0, as `make DEBUG=0` exports it).
QUIET_ENV = {k: v for k, v in os.environ.items() if k != "DEBUG"}


class CrictlError(RuntimeError):
    def __init__(self, argv: list[str], result: subprocess.CompletedProcess):
        self.stderr = result.stderr.decode(errors="replace") if isinstance(result.stderr, bytes) else result.stderr
        self.returncode = result.returncode
        super().__init__(f"crictl {' '.join(argv)} exited {result.returncode}: {self.stderr.strip()[-2000:]}")


class Crictl:
    def __init__(self, netns: NodeNetns, endpoint: str, work: Path, cgroup_parent: str):
        self.netns, self.work, self.cgroup_parent = netns, work, cgroup_parent
        self.config = work / "crictl.yaml"
        self.config.write_text(f"runtime-endpoint: {endpoint}\nimage-endpoint: {endpoint}\n"
                               f"timeout: {CALL_TIMEOUT_S}\npull-image-on-create: false\n")
        self.logs_dir = work / "logs"
        self.configs_dir = work / "configs"
        self.configs_dir.mkdir(exist_ok=True)

    def argv(self, *args: str) -> list[str]:
        return self.netns.argv(str(tools.upstream("crictl")), "--config", str(self.config), *args)

    def run(self, *args: str, input: bytes | None = None, check: bool = True,
            timeout: float = CALL_TIMEOUT_S + 30) -> subprocess.CompletedProcess:
        """Run crictl; output as bytes; CrictlError naming the command unless `check` is False."""
        result = subprocess.run(self.argv(*args), input=input, capture_output=True, timeout=timeout,
                                env=QUIET_ENV)
        if check and result.returncode != 0:
            raise CrictlError(list(args), result)
        return result

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        """crictl as a running child (attach, port-forward)."""
        return subprocess.Popen(self.argv(*args), env=QUIET_ENV, **kwargs)

    def text(self, *args: str) -> str:
        return self.run(*args).stdout.decode().strip()

    def _write(self, kind: str, config: dict) -> Path:
        path = self.configs_dir / f"{kind}-{uuid.uuid4().hex[:8]}.json"
        path.write_text(json.dumps(config, indent=1))
        return path

    # pods

    def pod_config(self, name: str, **extra) -> dict:
        """A PodSandboxConfig as kubelet would send it (log directory in the test's dir, cgroups
        under the node's parent)."""
        uid = uuid.uuid4().hex
        return {"metadata": {"name": name, "namespace": "e2e", "uid": uid, "attempt": 0},
                "hostname": name, "log_directory": str(self.logs_dir / uid),
                "linux": {"cgroup_parent": self.cgroup_parent, "security_context": {"namespace_options": {}}}, **extra}

    def runp(self, pod_config: dict, runtime: str) -> str:
        return self.text("runp", "--runtime", runtime, str(self._write("pod", pod_config)))

    def inspectp(self, pod_id: str, verbose: bool = True) -> dict:
        """The pod's status; verbose (crictl's default) adds the runtime's `info`."""
        quiet = [] if verbose else ["--quiet"]
        return json.loads(self.run("inspectp", *quiet, "-o", "json", pod_id).stdout)

    def stopp(self, pod_id: str) -> None:
        self.run("stopp", pod_id)

    def rmp(self, pod_id: str) -> None:
        self.run("rmp", pod_id)

    def pods(self) -> list[dict]:
        return json.loads(self.run("pods", "-o", "json").stdout).get("items", [])

    # containers

    @staticmethod
    def container_config(name: str, image: str, command: list[str] | None = None, **extra) -> dict:
        config = {"metadata": {"name": name}, "image": {"image": image}, "log_path": f"{name}.log", **extra}
        if command is not None:
            config["command"] = command
        return config

    def create(self, pod_id: str, container_config: dict, pod_config: dict) -> str:
        return self.text("create", "--no-pull", pod_id, str(self._write("ctr", container_config)),
                         str(self._write("pod", pod_config)))

    def start(self, container_id: str) -> None:
        self.run("start", container_id)

    def inspect(self, container_id: str) -> dict:
        return json.loads(self.run("inspect", "-o", "json", container_id).stdout)

    def state(self, container_id: str) -> str:
        return self.inspect(container_id)["status"]["state"]

    def logs(self, container_id: str) -> subprocess.CompletedProcess:
        """stdout and stderr of the container, each on crictl's stream of the same name."""
        return self.run("logs", container_id)

    def exec(self, container_id: str, *argv: str, input: bytes | None = None,
             check: bool = False) -> subprocess.CompletedProcess:
        """Streaming exec (what `kubectl exec` does): output exactly as the process wrote it."""
        return self.run("exec", *(["-i"] if input is not None else []), container_id, *argv,
                        input=input, check=check)

    def exec_sync(self, container_id: str, *argv: str) -> subprocess.CompletedProcess:
        """ExecSync (kubelet's probes): crictl exits with the process's exit code."""
        return self.run("exec", "--sync", container_id, *argv, check=False)

    def stop(self, container_id: str, timeout_s: int = 10) -> None:
        self.run("stop", "--timeout", str(timeout_s), container_id)

    def rm(self, container_id: str) -> None:
        self.run("rm", container_id)

    def stats(self, container_id: str) -> dict:
        return json.loads(self.run("stats", "-o", "json", "--id", container_id).stdout)

    def pull(self, image: str) -> None:
        self.run("pull", image)
