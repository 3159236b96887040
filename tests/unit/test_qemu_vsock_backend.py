"""The daemon's vsock backend process (vsock/serve.py driven by vmm/vsock_backend.py), real
process, no QEMU: QEMU's side is exercised by tests/vm/test_sandboxer_restart.py."""
import asyncio
import contextlib
import json
import os
import signal
import socket

import pytest

from host_sandboxer.config import ContainmentConfig
from host_sandboxer.vmm import process
from host_sandboxer.vmm.vsock_backend import BackendVsock, VsockBackend


def _vm_dirs(tmp_path, *names):
    dirs = []
    for name in names:
        (tmp_path / name).mkdir()
        dirs.append(tmp_path / name)
    return dirs


@contextlib.contextmanager
def _backend_left_by_a_dead_daemon(tmp_path):
    """A first daemon starts VM `a` (its backend process) and "dies", leaving the backend running;
    yields its pid for the next daemon, and kills it at the end if the test did not."""
    async def first_daemon():
        vm = BackendVsock(VsockBackend(tmp_path), tmp_path / "a")
        await vm.start()
        return vm.backend.proc.pid

    pid = asyncio.run(first_daemon())
    try:
        yield pid
    finally:
        if process.start_time(pid) is not None:
            os.kill(pid, signal.SIGKILL)


def test_one_process_serves_every_vm_and_ends_with_the_last(tmp_path):
    async def scenario():
        backend = VsockBackend(tmp_path)
        one, two = (BackendVsock(backend, d) for d in _vm_dirs(tmp_path, "a", "b"))
        await one.start()
        await two.start()
        pid = json.loads((tmp_path / "vsock-backend.json").read_text())["pid"]
        assert pid == backend.proc.pid
        assert all(os.path.exists(p) for vm in (one, two) for p in (vm.vhost_socket, vm.uds_path))
        assert oct((tmp_path / "vsock-backend.sock").stat().st_mode & 0o777) == "0o600"
        with pytest.raises(ConnectionRefusedError):  # no guest behind it: CONNECT is refused
            await one.open_connection(1024)
        await one.close()
        assert backend.proc.returncode is None and not one.vhost_socket.exists()
        await two.close()
        assert backend.proc.returncode is not None
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no record, socket or log left
    asyncio.run(scenario())


def test_a_restarted_daemon_adopts_the_process_and_its_vms(tmp_path):
    async def second_daemon():
        backend = VsockBackend(tmp_path)
        known, unknown = BackendVsock(backend, tmp_path / "a"), BackendVsock(backend, tmp_path / "b")
        assert await known.adopt()
        assert not await unknown.adopt() and unknown.dead.done()
        os.kill(backend.proc.pid, signal.SIGKILL)  # supervised: its VMs lose their link
        reason = await asyncio.wait_for(known.dead, 5)
        return reason, backend

    _vm_dirs(tmp_path, "a", "b")
    with _backend_left_by_a_dead_daemon(tmp_path):
        reason, backend = asyncio.run(second_daemon())
        assert reason.startswith("the vsock backend ended (exit status unknown")


def test_bad_requests_are_refused(tmp_path):
    async def scenario():
        backend = VsockBackend(tmp_path)
        vm = BackendVsock(backend, _vm_dirs(tmp_path, "a")[0])
        await vm.start()
        answers = [await backend._request(line) for line in ("ADD relative/dir", "FROB /x", f"ADD {tmp_path}/b")]
        with open(__file__) as not_a_socket, socket.socket(socket.AF_INET) as not_unix:
            answers.append(await backend._request(f"ADD {tmp_path}/b", (not_a_socket.fileno(), not_unix.fileno())))
        answers.append(await backend._request("LIST"))  # still serving
        await vm.close()
        return answers
    assert asyncio.run(scenario()) == ["ERR bad VM directory 'relative/dir'", "ERR unknown request 'FROB'",
                                       "ERR ADD needs 2 unix stream sockets (SCM_RIGHTS), got 0",
                                       "ERR ADD needs 2 unix stream sockets (SCM_RIGHTS), got 1",
                                       f"OK {tmp_path}/a"]


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing uid needs root")
def test_the_backend_runs_as_a_uid_of_its_own_without_capabilities(tmp_path):
    """As the daemon starts it (`[containment] backend_uid`): a uid that may not even look into
    the state directory (0700, root's), served nonetheless through the fds the daemon hands it;
    the files are root's and the daemon's to remove."""
    uid = ContainmentConfig().backend_uid

    async def scenario():
        backend = VsockBackend(tmp_path, user=uid)
        vm = BackendVsock(backend, *_vm_dirs(tmp_path, "a"))
        await vm.start()
        seen = _status(backend.proc.pid)
        owners = {p.name: p.stat().st_uid for p in (tmp_path / "vsock-backend.sock", vm.vhost_socket, vm.uds_path)}
        with pytest.raises(ConnectionRefusedError):  # served: no guest behind it, CONNECT is refused
            await vm.open_connection(1024)
        await vm.close()
        return seen, owners, backend.proc.returncode

    os.chmod(tmp_path, 0o700)
    seen, owners, returncode = asyncio.run(scenario())
    assert seen["Uid"].split() == [str(uid)] * 4 and seen["Gid"].split() == [str(uid)] * 4
    assert (seen["CapEff"], seen["CapBnd"], seen["NoNewPrivs"]) == ("0" * 16, "0" * 16, "1")
    assert owners == {"vsock-backend.sock": 0, "vhost-vsock.sock": 0, "vsock.sock": 0}
    assert returncode is not None and sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert list((tmp_path / "a").iterdir()) == []


def _ended(pid: int) -> bool:
    """Gone, or a zombie: here the backend is this test process's own child, reaped by the first
    event loop's watcher thread at its own pace (a daemon's backend is not its child)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_backend_no_recovered_pod_uses_is_stopped(tmp_path):
    """A daemon died inside a Start (the VM added, never recorded): the next one stops the
    backend it finds serving nothing it knows; a VM added anew after that is served afresh."""
    async def second_daemon(pid):
        backend = VsockBackend(tmp_path)
        await backend.stop_if_idle()
        stopped = _ended(pid)
        vm = BackendVsock(backend, tmp_path / "a")
        await vm.start()
        await vm.start()  # ADD again (a Start retried): served anew, not refused
        await vm.close()
        return stopped, backend.proc.returncode is not None

    _vm_dirs(tmp_path, "a")
    with _backend_left_by_a_dead_daemon(tmp_path) as pid:
        assert asyncio.run(second_daemon(pid)) == (True, True)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_the_backend_process_runs_without_site_asyncio_and_ssl(tmp_path):
    """Its host memory: stdlib + host_sandboxer.vsock only (lean_python.command(): -S, reactor.py)."""
    async def scenario():
        backend = VsockBackend(tmp_path)
        vm = BackendVsock(backend, *_vm_dirs(tmp_path, "a"))
        await vm.start()
        pid = backend.proc.pid
        facts = open(f"/proc/{pid}/cmdline").read().split("\0"), open(f"/proc/{pid}/maps").read()
        await vm.close()
        return facts
    argv, maps = asyncio.run(scenario())
    assert "-S" in argv and "/python3" in maps
    assert "_asyncio." not in maps and "libssl" not in maps and "_ssl." not in maps  # asyncio loads all 3
