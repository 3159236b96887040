#!/usr/bin/env python3
"""`make demo`: run a container in a microVM through vmm-sandboxer, driven the way containerd's
CRI drives a sandbox controller (and talks to the task address Start returns: ttrpc).

It starts the daemon on a private socket and state dir, then: Controller.Create/Start (the VM
boots), Task.Create with an overlay rootfs over a busybox tree (built from Debian's
busybox-static) and stdio FIFOs, Start, reads the container's output from the FIFO, Wait,
Delete, Task.Shutdown (the pod lives on), Controller.Stop and Shutdown. The container prints
`uname -r`: the guest kernel's release, not the host's.

The helpers here (daemon process, CRI-like client, bundles, FIFOs) are also what the whole-VM
tests in tests/vm/test_sandboxer*.py use.
"""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from google.protobuf import any_pb2, message_factory

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from host_sandboxer.containment.cgroups import Cgroup, Layout  # noqa: E402
from host_sandboxer.taskproxy.mounts import unmount_all_under  # noqa: E402
from vmm_common.protos.containerd.services.sandbox.v1 import sandbox_pb2 as sb  # noqa: E402
from vmm_common.protos.containerd.services.sandbox.v1 import sandbox_pb2_grpc as sb_grpc  # noqa: E402
from vmm_common.protos.containerd.task.v3 import shim_pb2 as task  # noqa: E402
from vmm_common.protos.containerd.types import mount_pb2  # noqa: E402
from vmm_common import ttrpc  # noqa: E402

NAMESPACE = (("containerd-namespace", "k8s.io"),)
# What containerd 2.3-2.4 write in config.json (2.0: 1.2.0, 2.1-2.2: 1.2.1); Debian 12's crun
# refuses all of these, the guest's crun (Debian 13) takes them.
OCI_VERSION = "1.3.0"
CACHE = Path(os.environ.get("VMM_TASK_CACHE", Path.home() / ".cache" / "vmm-task"))
IMAGE = REPO / "build" / "guest"
PROCESS_SPEC_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Process"


def busybox_tree() -> Path:
    """A busybox root filesystem (read-only lower layer), cached by busybox's size and mtime."""
    busybox = Path("/bin/busybox")
    st = busybox.stat()
    tree = CACHE / f"demo-busybox-v2-{st.st_size}-{int(st.st_mtime)}"
    if not tree.exists():
        tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=".busybox-"))
        tmp.chmod(0o755)
        for d in ("bin", "proc", "sys", "dev", "tmp", "etc", "root"):
            (tmp / d).mkdir()
        shutil.copy2(busybox, tmp / "bin" / "busybox")
        # Inside a chroot, the applet links point at /bin/busybox of the tree itself.
        subprocess.run(["chroot", str(tmp), "/bin/busybox", "--install", "-s", "/bin"], check=True)
        (tmp / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        tmp.rename(tree)
    return tree


def pod_options(hostname: str) -> any_pb2.Any:
    """CRI's runtime.v1.PodSandboxConfig with only `hostname` (field 2) set; the PID namespace
    mode is absent, i.e. POD: the pod's containers share one."""
    name = hostname.encode()
    return any_pb2.Any(type_url="type.googleapis.com/runtime.v1.PodSandboxConfig",
                       value=b"\x12" + bytes([len(name)]) + name)


def cri_spec(args: list[str], cid: str, sandbox_pid: int, terminal: bool = False) -> dict:
    """config.json as containerd's CRI writes it: host namespace paths of the sandbox's pid,
    a host cgroupsPath, a host bind mount for /etc/hostname."""
    caps = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
            "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
            "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]
    ns = [{"type": "pid", "path": f"/proc/{sandbox_pid}/ns/pid"},
          {"type": "ipc", "path": f"/proc/{sandbox_pid}/ns/ipc"},
          {"type": "uts", "path": f"/proc/{sandbox_pid}/ns/uts"},
          {"type": "mount"},
          {"type": "network", "path": f"/proc/{sandbox_pid}/ns/net"}]
    return {
        "ociVersion": OCI_VERSION,
        "process": {"terminal": terminal, "user": {"uid": 0, "gid": 0}, "args": args, "cwd": "/",
                    "env": ["PATH=/bin", "HOME=/root", "TERM=xterm"],
                    "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
                    "noNewPrivileges": True, "apparmorProfile": "cri-containerd.apparmor.d"},
        "root": {"path": "rootfs"},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {"cgroupsPath": f"/k8s.io/{cid}", "namespaces": ns,
                  "resources": {"cpu": {"shares": 2, "cpus": "0-1"}},
                  "maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"]},
    }


class Bundle:
    """A bundle dir as containerd prepares it: config.json, an empty rootfs/ mount point, the
    overlay rootfs mount (host paths) and stdio FIFOs under a separate IO dir."""

    def __init__(self, root: Path, cid: str, spec: dict, lower: Path):
        self.id = cid
        self.path = root / cid
        for d in ("rootfs", "upper", "work", "io"):
            (self.path / d).mkdir(parents=True)
        hostname = self.path / "hostname"
        hostname.write_text(f"{cid}\n")
        spec["mounts"].append({"destination": "/etc/hostname", "type": "bind", "source": str(hostname),
                               "options": ["rbind", "rprivate", "ro"]})
        (self.path / "config.json").write_text(json.dumps(spec))
        self.rootfs = [mount_pb2.Mount(type="overlay", source="overlay", options=[
            f"lowerdir={lower}", f"upperdir={self.path / 'upper'}", f"workdir={self.path / 'work'}",
            "index=off"])]

    def fifo(self, name: str) -> str:
        path = self.path / "io" / name
        os.mkfifo(path, 0o600)
        return str(path)


class FifoReader:
    """Reads a FIFO to EOF in a thread, as containerd's IO copier does."""

    def __init__(self, path: str):
        self.path = path
        self.data = bytearray()
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            with open(self.path, "rb", buffering=0) as f:
                while chunk := f.read(65536):
                    self.data += chunk
        except OSError as exc:
            self._error = exc

    def result(self, timeout: float = 30.0) -> bytes:
        """Everything up to EOF; an error if the stream did not end within `timeout` (a stream
        that never ends is a fault, never "what arrived so far") or could not be read."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"{self.path}: no end of file after {timeout:.0f} s "
                               f"({len(self.data)} bytes so far, ending {bytes(self.data[-80:])!r})")
        if self._error is not None:
            raise OSError(f"{self.path}: {self._error} after {len(self.data)} bytes") from self._error
        return bytes(self.data)


def template_line() -> str:
    """`[vm] template = true` when VMM_TASK_TEST_TEMPLATE=1: the tests' daemons restore pods
    from templates (docs/templates.md), else nothing."""
    return "template = true\n" if os.environ.get("VMM_TASK_TEST_TEMPLATE") == "1" else ""


class Daemon:
    """vmm-sandboxer as a child process on a private socket and state dir."""

    def __init__(self, workdir: Path, kernel: Path = IMAGE / "kernel", initrd: Path = IMAGE / "initrd.img",
                 containerd_address: str = ""):
        self.workdir = workdir
        self.socket = workdir / "ctl.sock"
        self.state = workdir / "s"
        self.log = workdir / "daemon.log"
        self.config = workdir / "config.toml"
        # A cgroup parent of its own: tests run daemons side by side, with the same pod IDs.
        self.cgroup_parent = f"vmm-demo-{workdir.name}"
        self.config.write_text(
            # the image's root for vm.image = pmem (the default on q35) is the one beside its initrd
            f'[vm]\nkernel = "{kernel}"\ninitrd = "{initrd}"\nrootfs = "{initrd.with_name("rootfs.img")}"\n'
            f'boot_timeout_s = 60.0\n{template_line()}'
            f'[vsock]\ntransport = "auto"\n[containerd]\naddress = "{containerd_address}"\n'
            f'[containment]\ncgroup_parent = "{self.cgroup_parent}"\n')
        self.proc = None

    def start(self, timeout: float = 20.0) -> None:
        self.socket.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(REPO / ".venv" / "bin" / "vmm-sandboxer"), "--listen", str(self.socket),
                 "--dir", str(self.state), "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vmm-sandboxer did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def cgroups_left(self) -> list[str]:
        """The cgroups under the daemon's parent but its helpers' (pods' left behind)."""
        return sorted(f"{d}" for root in Layout.probe().roots if (root / self.cgroup_parent).is_dir()
                      for d in (root / self.cgroup_parent).iterdir() if d.is_dir() and d.name != "vmm-helpers")

    def remove_cgroups(self) -> None:
        """The daemon's parent cgroup and those in it, deepest first, killing what runs there."""
        layout = Layout.probe()
        for root in layout.roots:
            for directory in sorted((root / self.cgroup_parent).glob("**/"), key=lambda p: -len(p.parts)):
                asyncio.run(Cgroup(layout.version, [directory]).remove())

    def stop(self) -> bool:
        """SIGTERM; True when the daemon ignored it for 10 s and was SIGKILLed."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return True
        return False


class Cri:
    """What containerd's CRI calls, as a gRPC client built from the generated stubs."""

    def __init__(self, socket: Path):
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.controller = sb_grpc.ControllerStub(self.channel)

    def run_pod(self, sandbox_id: str, timeout: float = 120.0, netns_path: str = "") -> sb.ControllerStartResponse:
        """Create + Start; `netns_path`: the pod's network namespace as the CNI made it (none: no NIC)."""
        self.controller.Create(sb.ControllerCreateRequest(sandbox_id=sandbox_id, options=pod_options(sandbox_id),
                                                          netns_path=netns_path),
                               metadata=NAMESPACE, timeout=10)
        return self.controller.Start(sb.ControllerStartRequest(sandbox_id=sandbox_id),
                                     metadata=NAMESPACE, timeout=timeout)

    def remove_pod(self, sandbox_id: str) -> None:
        self.controller.Stop(sb.ControllerStopRequest(sandbox_id=sandbox_id, timeout_secs=5),
                             metadata=NAMESPACE, timeout=60)
        self.controller.Shutdown(sb.ControllerShutdownRequest(sandbox_id=sandbox_id), metadata=NAMESPACE, timeout=60)

    @staticmethod
    def task_client(address: str) -> "TaskClient":
        return TaskClient(address)


class TaskClient:
    """containerd.task.v3.Task at a task address (`ttrpc+unix:///PATH`), one ttrpc connection
    as containerd's shim client holds one per container; called like a gRPC stub,
    `client.State(request, metadata=..., timeout=...)`, from any thread (a Wait held in one while
    others go on). A failed call raises ttrpc.RpcError. The calls run on one event loop in a
    thread shared by every client."""

    SERVICE = "containerd.task.v3.Task"
    _METHODS = task.DESCRIPTOR.services_by_name["Task"].methods_by_name
    _loop: asyncio.AbstractEventLoop | None = None

    def __init__(self, address: str):
        scheme = "ttrpc+unix://"
        assert address.startswith(scheme + "/"), address
        self.path = address[len(scheme):]
        self._client = self._run(ttrpc.Client.connect_unix(self.path), None)

    @classmethod
    def _run(cls, coroutine, timeout):
        if cls._loop is None:
            cls._loop = asyncio.new_event_loop()
            threading.Thread(target=cls._loop.run_forever, name="ttrpc clients", daemon=True).start()
        return asyncio.run_coroutine_threadsafe(coroutine, cls._loop).result(timeout)

    def __getattr__(self, method: str):
        if method not in self._METHODS:
            raise AttributeError(method)
        response_type = message_factory.GetMessageClass(self._METHODS[method].output_type)

        def call(request, metadata=(), timeout=None):
            return self._run(self._client.call(self.SERVICE, method, request, response_type,
                                               timeout=timeout, metadata=dict(metadata)), None)
        return call

    def close(self) -> None:
        self._run(self._client.close(), 10)


def run_container(tasks, bundle: Bundle, timeout: float = 60.0) -> tuple[bytes, bytes, int]:
    """Create/Start/Wait/Delete one container; returns (stdout, stderr, exit status)."""
    stdout, stderr = bundle.fifo("stdout"), bundle.fifo("stderr")
    out, err = FifoReader(stdout), FifoReader(stderr)
    tasks.Create(task.CreateTaskRequest(id=bundle.id, bundle=str(bundle.path), rootfs=bundle.rootfs,
                                        stdout=stdout, stderr=stderr), metadata=NAMESPACE, timeout=timeout)
    tasks.Start(task.StartRequest(id=bundle.id), metadata=NAMESPACE, timeout=timeout)
    status = tasks.Wait(task.WaitRequest(id=bundle.id), metadata=NAMESPACE, timeout=timeout).exit_status
    result = out.result(), err.result(), status
    tasks.Delete(task.DeleteRequest(id=bundle.id), metadata=NAMESPACE, timeout=timeout)
    tasks.Shutdown(task.ShutdownRequest(id=bundle.id), metadata=NAMESPACE, timeout=timeout)
    return result


def main() -> int:
    if os.geteuid() != 0:
        print("make demo: needs root (it mounts the container's overlay rootfs)", file=sys.stderr)
        return 1
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vmm-demo-"))
    daemon = Daemon(work)
    pod = "demo-pod"
    try:
        lower = busybox_tree()
        daemon.start()
        cri = Cri(daemon.socket)
        started = time.monotonic()
        response = cri.run_pod(pod)
        print(f"pod {pod}: VM pid {response.pid} ready in {time.monotonic() - started:.1f} s, "
              f"task API at {response.address}")
        bundle = Bundle(work / "bundles", "demo-ctr", cri_spec(["uname", "-r"], "demo-ctr", response.pid), lower)
        out, err, status = run_container(cri.task_client(response.address), bundle)
        print(f"container uname -r: {out.decode().strip()}   (host: {os.uname().release})")
        if err:
            print(f"container stderr: {err.decode().strip()}")
        print(f"container exit code: {status}")
        cri.remove_pod(pod)
        print(f"pod {pod}: stopped and removed")
        return 0 if status == 0 and out.strip() else 1
    except (grpc.RpcError, ttrpc.RpcError) as exc:  # the Controller's (gRPC) or the task API's (ttrpc)
        what = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else f"task API: {exc}"
        print(f"make demo failed: {what}", file=sys.stderr)
        print(f"daemon log tail:\n{daemon.log.read_text()[-2000:]}", file=sys.stderr)
        return 1
    finally:
        daemon.stop()
        if daemon.cgroups_left() == []:  # a failed run's pods run on (the daemon leaves them)
            daemon.remove_cgroups()
        unmount_all_under(work)  # whatever a failed run left mounted, before removing files
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
