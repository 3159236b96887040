"""The agent's containers and their processes: the Task API's operations with the runc shim's
state rules and error codes, independent of the wire (services/task.py maps requests here)."""

import asyncio
import itertools
import json
import logging
import os
import shutil
import signal as signals
from typing import Callable, Optional

from . import oom as oommod
from .cgroups import Cgroup
from .errors import TaskError, already_exists, failed_precondition, invalid_argument, not_found
from .ids import check_id
from .mounts import Mount, mount_rootfs, unmount
from .options import CreateOptions
from .process import CREATED, PAUSED, RUNNING, STOPPED, Process
from .runtime import Runtime, RuntimeFailure
from .spec import absolute_root, add_pod_files, apply_pod_namespaces, load_bundle_spec, \
    parse_exec_process, process_owner, save_bundle_spec
from .stdio import ProcessIO, Stdio

log = logging.getLogger(__name__)

CREATED_EXIT_WAIT = 5.0  # seconds Delete waits for a force-deleted created init to be reaped


class Container:
    """`shared_bundle`: the bundle is the host's, in the shared directory (Kuasar's convention):
    the container runs from the agent's own copy of its spec, and the host's files for it (io
    files of execs) are found there. `io_owner`: the owner of its stdio pipes when the Create
    options named one."""

    def __init__(self, cid: str, bundle: str, workdir: str, init: Process, shares_pids: bool,
                 shared_bundle: bool = False, io_owner: Optional[tuple[int, int]] = None):
        self.id = cid
        self.bundle = bundle
        self.workdir = workdir
        self.shared_bundle = shared_bundle
        self.io_owner = io_owner
        self.init = init
        self.execs: dict[str, Process] = {}
        self.shares_pids = shares_pids  # no PID namespace of its own: kill all when init exits
        self.cgroup: Optional[Cgroup] = None
        self.oom: Optional[oommod.OomWatcher] = None
        self.rootfs_mounts = 0
        self.lock = asyncio.Lock()

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        check_id("exec", exec_id)
        try:
            return self.execs[exec_id]
        except KeyError:
            raise not_found(f"exec {exec_id} of container {self.id} not found") from None


class ContainerTable:
    """`pod()` gives the pod's namespaces {"ipc"|"uts"|"pid": path or None} and files
    {destination: path}; `on_exit(container, process)` and `on_oom(container)` are called on
    the loop. `volumes` mounts the storages a container needs before it is created and unmounts
    them when no container uses them any more (`await acquire(cid, storages)`, `release(cid)`:
    vmm_task.kuasar.storages.StorageTable)."""

    def __init__(self, runtime: Runtime, reaper, run_dir: str,
                 pod: Callable[[], tuple[dict, dict]], on_exit: Callable, on_oom: Callable,
                 volumes):
        self.runtime = runtime
        self._volumes = volumes
        self._reaper = reaper
        self._run_dir = run_dir
        self._pod = pod
        self._on_exit = on_exit
        self._on_oom = on_oom
        self._containers: dict[str, Container] = {}
        self._reserved: set[str] = set()
        self._serial = itertools.count()

    def __len__(self) -> int:
        return len(self._containers)

    def get(self, cid: str) -> Container:
        check_id("container", cid)
        try:
            return self._containers[cid]
        except KeyError:
            raise not_found(f"container {cid} not found") from None

    def _socket_path(self) -> str:
        return os.path.join(self._run_dir, f"console-{next(self._serial)}.sock")

    # -- Create / Start / Exec ----------------------------------------------------------------

    async def create(self, cid: str, bundle: str, rootfs: list[Mount], stdio: Stdio,
                     options: CreateOptions = CreateOptions(), shared_bundle: bool = False,
                     storages: tuple = ()) -> Container:
        """`rootfs`: mounts to make on `<bundle>/rootfs` first. `shared_bundle`: see Container
        (the host made the rootfs; its spec is left as it is). `storages`: for `volumes`."""
        check_id("container", cid)
        if cid in self._containers or cid in self._reserved:
            raise already_exists(f"container {cid} already exists")
        self._reserved.add(cid)
        try:
            await self._volumes.acquire(cid, storages)
            try:
                return await self._create(cid, bundle, rootfs, stdio, options, shared_bundle)
            except BaseException:
                self._volumes.release(cid)
                raise
        finally:
            self._reserved.discard(cid)

    async def _create(self, cid, bundle, rootfs, stdio, options, shared_bundle) -> Container:
        spec = load_bundle_spec(bundle)
        namespaces, files = self._pod()
        changed = apply_pod_namespaces(spec, namespaces) | add_pod_files(spec, files)
        namespaces = spec.get("linux", {}).get("namespaces", [])
        own_pid_ns = any(ns.get("type") == "pid" and not ns.get("path") for ns in namespaces)
        uid, gid = options.io_owner or process_owner(spec.get("process"), f"container {cid}")
        workdir = os.path.join(self._run_dir, "containers", cid)
        io = ProcessIO(*stdio, self._socket_path(), uid, gid)
        container = Container(cid, bundle, workdir, Process(cid, "", io), not own_pid_ns,
                              shared_bundle, options.io_owner)
        run_from = workdir if shared_bundle else bundle
        created = False
        try:
            os.makedirs(workdir, mode=0o700, exist_ok=True)
            if shared_bundle:
                absolute_root(spec, bundle)
                save_bundle_spec(workdir, spec)
            elif changed:
                save_bundle_spec(bundle, spec)
            if rootfs:
                container.rootfs_mounts = mount_rootfs(rootfs, os.path.join(bundle, "rootfs"))
            pid_file = os.path.join(workdir, "init.pid")
            console, fds = io.prepare()
            await self.runtime.create(cid, run_from, pid_file, console, fds,
                                      options.no_pivot_root, options.no_new_keyring)
            created = True
            await io.started()
            pid = _read_pid(pid_file)
        except BaseException:
            io.close()
            if created:
                await _quietly(self.runtime.delete(cid, force=True))
            for _ in range(container.rootfs_mounts):
                unmount(os.path.join(bundle, "rootfs"))
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        container.cgroup = Cgroup.of_pid(pid)
        container.oom = oommod.watch(container.cgroup, lambda: self._on_oom(container))
        self._containers[cid] = container
        container.init.started(pid, self._reaper, lambda p: self._exited(container, p),
                               self._leftovers_killer(container))
        return container

    def _exited(self, container: Container, process: Process) -> None:
        """A process of `container` ended: its OOM kills first (TaskOOM before TaskExit)."""
        if container.oom is not None:
            container.oom.catch_up()
        self._on_exit(container, process)

    async def start(self, cid: str, exec_id: str,
                    on_started: Callable[[Process], None]) -> Process:
        """Start the init or an exec; `on_started(process)` runs before its exit can be reported
        (the TaskStart event must precede TaskExit)."""
        container = self.get(cid)
        async with container.lock:
            process = container.process(exec_id)
            if process.status != CREATED:
                raise failed_precondition(f"{process.name} is {process.status}: cannot start it")
            if exec_id and container.init.status not in (RUNNING, PAUSED):
                raise failed_precondition(
                    f"container {cid} is {container.init.status}: cannot start exec {exec_id}")
            process.exit_gate.clear()
            try:
                if exec_id:
                    await self._start_exec(container, process)
                else:
                    await self.runtime.start(cid)
                    process.status = RUNNING
                on_started(process)
            finally:
                process.exit_gate.set()
            return process

    async def _start_exec(self, container: Container, process: Process) -> None:
        base = os.path.join(container.workdir, "exec-" + process.exec_id)
        try:
            with open(base + ".json", "w", encoding="utf-8") as f:
                json.dump(process.spec, f)
            console, fds = process.io.prepare()
            await self.runtime.exec(container.id, base + ".json", base + ".pid", console, fds)
            await process.io.started()
            pid = _read_pid(base + ".pid")
        except BaseException:
            process.io.close()
            process.set_exited(255, 0)
            raise
        process.status = RUNNING
        process.started(pid, self._reaper, lambda p: self._exited(container, p))

    async def exec(self, cid: str, exec_id: str, stdio: Stdio, spec: bytes) -> Process:
        container = self.get(cid)
        check_id("exec", exec_id)
        if exec_id in container.execs:
            raise already_exists(f"exec {exec_id} already exists in container {cid}")
        if container.init.status not in (RUNNING, PAUSED):
            raise failed_precondition(f"container {cid} is {container.init.status}: "
                                      "it must be running to exec in it")
        what = f"exec {exec_id} of container {cid}"
        process_spec = parse_exec_process(spec, what)
        process_spec["terminal"] = stdio.terminal
        uid, gid = container.io_owner or process_owner(process_spec, what)
        io = ProcessIO(*stdio, self._socket_path(), uid, gid)
        process = Process(cid, exec_id, io, process_spec)
        container.execs[exec_id] = process
        return process

    def _leftovers_killer(self, container: Container):
        """For a container without a PID namespace of its own, what kills the processes its
        init left once the init is reaped, before its exit is recorded (as containerd's runc
        shim does, handleProcessExit): with the kill done before a Wait answers, the Delete that
        follows never meets the runtime mid-kill (runc's kill --all freezes the cgroup, and a
        delete then fails: "invalid state transition from stopped to paused")."""
        if not container.shares_pids:
            return None
        return lambda: _quietly(self.runtime.kill(container.id, signals.SIGKILL, True))

    # -- signals and waiting -------------------------------------------------------------------

    async def kill(self, cid: str, exec_id: str, signal: int, all_processes: bool) -> None:
        """A process that has exited, even one whose exit is not reported yet (reaped, output
        still draining), is NOT_FOUND, as the runc shim answers (checkKillError: "process
        already finished"): containerd's stop path ignores exactly that. Kill(all) of an init
        still signals what the init left behind in the container."""
        container = self.get(cid)
        process = container.process(exec_id)
        if not 0 <= signal < 65:
            raise invalid_argument(f"{process.name}: {signal} is not a signal number")
        leftovers = all_processes and not exec_id
        if process.status == STOPPED or (process.reaped and not leftovers):
            raise _already_exited(process)
        if exec_id:
            if process.status == CREATED:
                raise failed_precondition(f"{process.name} has not been started")
            try:
                os.kill(process.pid, signal)
            except ProcessLookupError:
                raise _already_exited(process) from None
            return
        try:
            await self.runtime.kill(cid, signal, all_processes)
        except RuntimeFailure:
            # the init exited while the runtime looked for it ("open pidfd: No such process");
            # its exit was reaped before the runtime's, so it is known here by now
            if process.reaped:
                raise _already_exited(process) from None
            raise

    async def wait(self, cid: str, exec_id: str) -> Process:
        process = self.get(cid).process(exec_id)
        await process.wait()
        return process

    # -- Delete -----------------------------------------------------------------------------------

    async def delete(self, cid: str, exec_id: str) -> Process:
        container = self.get(cid)
        if exec_id:
            process = container.process(exec_id)
            if process.status in (RUNNING, PAUSED):
                raise failed_precondition(f"{process.name} is running: kill it before Delete")
            process.close()
            del container.execs[exec_id]
            return process
        async with container.lock:
            init = container.init
            if init.status in (RUNNING, PAUSED):
                raise failed_precondition(f"container {cid} is {init.status}: kill it before Delete")
            try:
                await self.runtime.delete(cid, force=True)
            except TaskError as e:  # its state is gone: nothing left to hold the container
                log.warning("%s; releasing container %s anyway", e, cid)
            if init.pid and not init.exited:
                try:
                    await asyncio.wait_for(init.wait(), CREATED_EXIT_WAIT)
                except asyncio.TimeoutError:
                    init.set_exited(255, 0)
            self._release(container)
            return init

    def _release(self, container: Container) -> None:
        for process in [container.init, *container.execs.values()]:
            process.close()
        if container.oom is not None:
            container.oom.close()
        for _ in range(container.rootfs_mounts):
            try:
                unmount(os.path.join(container.bundle, "rootfs"))
            except OSError as e:
                log.warning("container %s: %s", container.id, e)
        shutil.rmtree(container.workdir, ignore_errors=True)
        del self._containers[container.id]
        self._volumes.release(container.id)

    # -- Pause / Resume / Update ------------------------------------------------------------------

    async def pause(self, cid: str) -> None:
        await self._switch(cid, RUNNING, PAUSED, self.runtime.pause, "paused")

    async def resume(self, cid: str) -> None:
        await self._switch(cid, PAUSED, RUNNING, self.runtime.resume, "resumed")

    async def _switch(self, cid: str, before: str, after: str, action, verb: str) -> None:
        """Pause or Resume: only from `before`; the state becomes `after` unless the container
        exited meanwhile."""
        container = self.get(cid)
        async with container.lock:
            if container.init.status != before:
                raise failed_precondition(f"container {cid} is {container.init.status}: "
                                          f"only a {before} container can be {verb}")
            await action(cid)
            if container.init.status == before:
                container.init.status = after

    async def update(self, cid: str, resources: bytes) -> None:
        """`resources`: the OCI LinuxResources as JSON (containerd's typeurl for it)."""
        container = self.get(cid)
        try:
            parsed = json.loads(resources)
        except ValueError as e:
            raise invalid_argument(f"update of {cid}: resources are not JSON LinuxResources: {e}") \
                from None
        if not isinstance(parsed, dict):
            raise invalid_argument(f"update of {cid}: resources must be a JSON object")
        async with container.lock:
            if container.init.status == STOPPED:
                raise failed_precondition(f"container {cid} has exited: nothing to update")
            path = os.path.join(container.workdir, "resources.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(parsed, f)
            await self.runtime.update(cid, path)

    # -- queries ----------------------------------------------------------------------------------

    def pids(self, cid: str) -> list[tuple[int, str]]:
        """(pid, exec id or "") of every process in the container's cgroup."""
        container = self.get(cid)
        by_pid = {p.pid: p.exec_id for p in container.execs.values() if p.pid}
        pids = container.cgroup.pids() if container.cgroup else []
        if not pids and container.init.pid and not container.init.exited:
            pids = [container.init.pid]
        return [(pid, by_pid.get(pid, "")) for pid in pids]

    def stats(self, cid: str):
        from .stats import metrics
        container = self.get(cid)
        if container.cgroup is None:
            raise failed_precondition(f"container {cid} has no cgroup to read statistics from")
        return metrics(container.cgroup)

    def resize(self, cid: str, exec_id: str, width: int, height: int) -> None:
        process = self.get(cid).process(exec_id)
        if not (0 <= width < 65536 and 0 <= height < 65536):
            raise invalid_argument(f"{process.name}: terminal size {width}x{height} out of range")
        if process.io.master is None:
            raise failed_precondition(f"{process.name} has no terminal to resize")
        process.io.resize(width, height)

    async def close_io(self, cid: str, exec_id: str) -> None:
        await self.get(cid).process(exec_id).io.close_stdin()

    def all(self) -> list[Container]:
        return list(self._containers.values())


def _already_exited(process: Process) -> TaskError:
    return not_found(f"{process.name} has already exited: nothing to signal")


def _read_pid(path: str) -> int:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError) as e:
        raise TaskError("UNKNOWN", f"the runtime wrote no usable pid file {path}: {e}") from None


async def _quietly(coroutine) -> None:
    try:
        await coroutine
    except TaskError as e:
        log.info("%s", e)
