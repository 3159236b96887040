"""Pod networking end to end: vmm-sandboxer starts a pod in a network namespace the test made
(veth to a peer namespace, 192.0.2.0/24); containers in the VM ping the peer, connect to a TCP
server in the peer namespace and serve TCP to the peer, and are reached from localhost of the
pod namespace as CRI's port-forward dials them; Stop leaves the pod namespace as the "CNI" made
it.  Only the test's own namespaces carry traffic."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import grpc
import pytest

from bench.netpair import GATEWAY, PEER_IP, POD_IP, NetnsPair, sh
from bench.netpod import Daemon, NetPod, demo
from host_sandboxer import network
from host_sandboxer.config import ContainmentConfig
from host_sandboxer.network import pod as pod_network
from host_sandboxer.network.netns import run_in_netns
from host_sandboxer.portforward import redirect
from host_sandboxer.vmm.vm import GuestVm
from leak_guard import fail_if_left, stop_daemon
from vmm_common.protos.containerd.services.sandbox.v1 import sandbox_pb2 as sb

pytestmark = [pytest.mark.vm, pytest.mark.skipif(os.geteuid() != 0, reason="netns and mounts need root")]
PEER_PORT, POD_PORT, FORWARDED_PORT, NOBODY_PORT = 8080, 8081, 8082, 8099


@pytest.fixture
def daemon(guest_image):
    d = Daemon(guest_image.kernel, guest_image.initrd)
    yield d
    left = stop_daemon(d.daemon, d.work)
    d.close()
    fail_if_left(left)


def _serve_once(server, reply: bytes) -> bytes:
    server.settimeout(60)
    conn, _ = server.accept()
    with conn:
        conn.settimeout(30)
        data = conn.recv(100)
        conn.sendall(reply)
    return data


def test_containers_reach_the_peer_and_are_reached_through_the_pod_namespace(daemon):
    with NetnsPair() as pair:
        before = pair.snapshot(pair.pod)
        pod = NetPod(daemon, pair)
        try:
            assert "tap0_vmm" in {link["ifname"] for link in pair.links(pair.pod)}
            out, err, status = pod.run("c-ip", "ip -o addr show eth0; ip route; "
                                       "cat /sys/class/net/eth0/address")
            assert status == 0, err
            assert f"inet {POD_IP}/24" in out
            assert f"default via {GATEWAY} dev eth0" in out
            assert pair.mac(pair.pod) in out  # the guest NIC carries the pod link's MAC

            out, err, status = pod.run("c-ping", f"ping -c 2 -W 10 {PEER_IP}")
            assert status == 0, out + err
            assert "2 packets received" in out

            with pod.peer_socket() as server, concurrent.futures.ThreadPoolExecutor(1) as pool:
                server.bind((PEER_IP, PEER_PORT))
                server.listen(1)
                received = pool.submit(_serve_once, server, b"hello-from-peer\n")
                out, err, status = pod.run("c-tcp-out", f"echo hello-from-vm | nc {PEER_IP} {PEER_PORT}")
                assert status == 0, err
                assert received.result(60) == b"hello-from-vm\n"
                assert out == "hello-from-peer\n"

            container = pod.run_in_background("c-tcp-in", f"echo hello-from-vm | nc -l -p {POD_PORT}")
            with pod.connect_from_peer(POD_PORT) as conn:
                conn.sendall(b"hello-from-peer\n")
                assert conn.recv(100) == b"hello-from-vm\n"
            out, err, status = container.result(60)
            assert (out, status) == ("hello-from-peer\n", 0), err
        finally:
            pod.remove()
        assert pair.snapshot(pair.pod) == before


def _localhost_exchange(pair: NetnsPair, port: int, payload: bytes) -> bytes:
    """Dial 127.0.0.1:port inside the pod namespace (as containerd's PortForward does), send
    `payload`, half-close, and read until EOF."""
    sock = run_in_netns(pair.pod_path, lambda: socket.create_connection(("127.0.0.1", port), 10))
    with sock:
        sock.settimeout(60)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)


def _until_served(pair: NetnsPair, port: int, payload: bytes, deadline_s: float = 60) -> bytes:
    """_localhost_exchange, again while nothing listens yet in the guest (the client is reset)
    or, in a restarted daemon still taking its pods over, the port-forward listener is not back
    (refused: the daemon serves before its takeover is done, docs/restarts.md)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return _localhost_exchange(pair, port, payload)
        except (ConnectionResetError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_port_forward_reaches_a_container_through_localhost_of_the_pod_namespace(daemon):
    """What containerd's CRI PortForward does for a pod with a netns: dial localhost:PORT in it.
    Bytes go both ways, each side's EOF reaches the other; a port nobody listens on resets the
    client at once; teardown removes the listener and the nftables rule."""
    with NetnsPair() as pair:
        before = pair.snapshot(pair.pod)
        pod = NetPod(daemon, pair, "pfpod")
        try:
            assert daemon.info("pfpod")["port_forward"].startswith("127.0.0.1:")
            payload = os.urandom(1 << 20)
            # the server answers once it saw the client's EOF, then closes: EOF for the client
            server = pod.run_in_background(
                "c-pf", f"nc -l -p {FORWARDED_PORT} -e sh -c 'sha256sum; head -c 1048576 /dev/zero'")
            answer = _until_served(pair, FORWARDED_PORT, payload)
            assert answer == f"{hashlib.sha256(payload).hexdigest()}  -\n".encode() + bytes(1 << 20)
            out, err, status = server.result(60)
            assert status == 0, out + err

            began = time.monotonic()
            with pytest.raises(ConnectionResetError):
                _localhost_exchange(pair, NOBODY_PORT, b"hello")
            assert time.monotonic() - began < 10
        finally:
            pod.remove()
        assert pair.snapshot(pair.pod) == before
        with pytest.raises(ConnectionRefusedError):  # localhost of the namespace is its own again
            run_in_netns(pair.pod_path, lambda: socket.create_connection(("127.0.0.1", FORWARDED_PORT), 10))


def test_missing_network_namespace_is_refused_at_create_and_leaves_nothing(daemon):
    with pytest.raises(grpc.RpcError) as info:
        daemon.create("nonet", "/var/run/netns/vmmt-absent")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "netns_path '/var/run/netns/vmmt-absent': No such file or directory" in info.value.details()
    assert not (daemon.daemon.state / "nonet").exists()  # no pod directory, no VMM
    with pytest.raises(grpc.RpcError) as info:
        daemon.start("nonet")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_multiqueue_nic_with_two_vcpus_answers_the_peer(vm_config, vm_loop, tmp_path):
    """The launcher level, no containers: 2 vCPUs -> a 2-queue tap and virtio-net mq; the guest
    kernel itself answers the peer's ping once the agent configured eth0 by MAC."""
    config = dataclasses.replace(vm_config, vm=dataclasses.replace(vm_config.vm, cpus=2))
    record, run_dir = tmp_path / "network.json", Path(tempfile.mkdtemp(prefix="vmnet-"))
    with NetnsPair() as pair:
        before = pair.snapshot(pair.pod)

        started: list[GuestVm] = []

        async def boot() -> GuestVm:
            attachment = await network.attach(pair.pod_path, 2, record)
            # As the daemon's pods run: QEMU a user of its own (its taps' queues are attached
            # and detached as the guest asks: TUNSETQUEUE on a tap with no owner needs no capability).
            guest = GuestVm(config, run_dir, name="vmnet-mq", nics=attachment.nics,
                            vmm_uid=ContainmentConfig().vmm_uid_base + 4321)
            started.append(guest)  # closed below whatever happens
            try:
                await guest.start()
            finally:
                attachment.close_fds()
            client = await guest.ttrpc_client()
            try:
                await pod_network.configure_guest(client.call, attachment)
            finally:
                await client.close()
            return guest

        try:
            guest = vm_loop.run(boot())
            assert "tap,id=tap0_vmm,fds=" in " ".join(guest.qemu.argv)
            assert f"mac={pair.mac(pair.pod)},mq=on,vectors=6" in " ".join(guest.qemu.argv)
            assert "multi_queue" in sh("ip", "-n", pair.pod, "-d", "link", "show", "tap0_vmm")
            ping = pair.exec(pair.peer, "busybox", "ping", "-c", "3", "-W", "10", POD_IP)
            assert ping.returncode == 0 and "3 packets received" in ping.stdout, ping.stdout + ping.stderr
        finally:
            for guest in started:
                vm_loop.run(guest.close())
            vm_loop.run(network.detach(record))
            shutil.rmtree(run_dir, ignore_errors=True)
        assert "tap0_vmm" not in {link["ifname"] for link in pair.links(pair.pod)}
        assert pair.snapshot(pair.pod) == before


def test_daemon_killed_then_shutdown_restores_the_namespace_from_the_record(daemon):
    """SIGKILL the daemon with a networked pod running: the redirect on the pod's veth, the
    port-forward rule and the record stay; the restarted daemon re-attaches the pod, its
    port-forwarding with it (a new listener), and its Shutdown gives the namespace back as the
    CNI made it."""
    with NetnsPair() as pair:
        before = pair.snapshot(pair.pod)
        pod = NetPod(daemon, pair, "crashnet")
        daemon.daemon.proc.kill()
        daemon.daemon.proc.wait(10)
        left = pair.snapshot(pair.pod)
        assert ("eth0", "ingress") in left["qdiscs"]
        assert f"table ip {redirect.TABLE}" in left["nft_tables"]
        assert (daemon.daemon.state / "crashnet" / "network.json").exists()
        daemon.daemon.start()
        server = pod.run_in_background("c-pf", f"nc -l -p {FORWARDED_PORT} -e echo recovered")
        assert _until_served(pair, FORWARDED_PORT, b"") == b"recovered\n"
        assert server.result(60)[2] == 0
        daemon.cri.controller.Shutdown(sb.ControllerShutdownRequest(sandbox_id="crashnet"),
                                       metadata=demo.NAMESPACE, timeout=60)
        assert pair.snapshot(pair.pod) == before
