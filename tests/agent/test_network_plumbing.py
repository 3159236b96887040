"""Host pod networking with real netlink, in two network namespaces the test makes (veth,
192.0.2.0/24): taps + tc redirects made and removed, frames really crossing tap <-> peer,
refusals that leave nothing behind, teardown from the record after a crash."""
from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from bench.netpair import PEER_IP, POD_IP, NetnsPair, sh
from host_sandboxer import network
from host_sandboxer.network.netns import run_in_netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
VNET_HDR = bytes(10)  # struct virtio_net_hdr, all zero: no offloads
UDP_PORT = 40007


@pytest.fixture
def pair():
    with NetnsPair() as p:
        yield p


def run(coro):
    return asyncio.run(coro)


def mirred_targets(p: NetnsPair, dev: str) -> list[str]:
    filters = json.loads(sh("tc", "-n", p.pod, "-j", "filter", "show", "dev", dev, "ingress"))
    return [action["to_dev"] for f in filters for action in f.get("options", {}).get("actions", [])
            if action.get("kind") == "mirred"]


def test_attach_plumbs_a_multiqueue_tap_and_detach_restores_the_namespace(pair, tmp_path):
    before = pair.snapshot(pair.pod)
    record = tmp_path / "network.json"
    attachment = run(network.attach(pair.pod_path, 2, record))
    try:
        (nic,) = attachment.nics
        assert nic.id == "tap0_vmm" and len(nic.fds) == 2
        assert nic.mac == pair.mac(pair.pod)  # the guest NIC takes the pod link's MAC
        links = {link["ifname"]: link for link in pair.links(pair.pod)}
        assert links["tap0_vmm"]["linkinfo"]["info_kind"] == "tun"
        assert links["tap0_vmm"]["mtu"] == links["eth0"]["mtu"]
        assert "UP" in links["tap0_vmm"]["flags"]
        assert mirred_targets(pair, "eth0") == ["tap0_vmm"]
        assert mirred_targets(pair, "tap0_vmm") == ["eth0"]
        assert json.loads(record.read_text())["links"] == [
            {"name": "eth0", "index": links["eth0"]["ifindex"], "tap": "tap0_vmm"}]
        assert sh("ip", "-n", pair.pod, "-4", "-o", "addr", "show", "eth0").split()[3] == f"{POD_IP}/24"
    finally:
        attachment.close_fds()
        run(network.detach(record))
    assert pair.snapshot(pair.pod) == before
    assert not record.exists()
    run(network.detach(record))  # idempotent


def _udp_frame(src_mac: str, dst_mac: str, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", UDP_PORT, UDP_PORT, 8 + len(payload), 0) + payload  # no checksum
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, socket.IPPROTO_UDP, 0,
                         socket.inet_aton(POD_IP), socket.inet_aton(PEER_IP))
    total = sum(struct.unpack("!10H", header))
    total = (total & 0xFFFF) + (total >> 16)
    checksum = ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF
    header = header[:10] + struct.pack("!H", checksum) + header[12:]
    mac = lambda m: bytes.fromhex(m.replace(":", ""))  # noqa: E731
    return mac(dst_mac) + mac(src_mac) + b"\x08\x00" + header + udp


def _read_frames(fds, until: float):
    while time.monotonic() < until:
        ready, _, _ = select.select(fds, [], [], max(0.0, until - time.monotonic()))
        for fd in ready:
            yield os.read(fd, 65536)[len(VNET_HDR):]


def test_frames_cross_between_the_tap_and_the_peer(pair, tmp_path):
    """What the VM would see and send, without a VM: the peer's ARP for the pod IP comes out
    of the tap; a UDP frame written into the tap reaches a socket in the peer namespace."""
    record = tmp_path / "network.json"
    attachment = run(network.attach(pair.pod_path, 2, record))
    try:
        fds = list(attachment.nics[0].fds)
        peer_path = f"/var/run/netns/{pair.peer}"

        def send_to_pod():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"hello", (POD_IP, UDP_PORT))
        run_in_netns(peer_path, send_to_pod)
        arp = next((f for f in _read_frames(fds, time.monotonic() + 5)
                    if f[12:14] == b"\x08\x06" and f[38:42] == socket.inet_aton(POD_IP)), None)
        assert arp is not None, "the peer's ARP request for the pod IP never reached the tap"

        receiver = run_in_netns(peer_path, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        with receiver:
            receiver.bind((PEER_IP, UDP_PORT))
            receiver.settimeout(5)
            frame = _udp_frame(pair.mac(pair.pod), pair.mac(pair.peer), b"from the VM side")
            os.write(fds[0], VNET_HDR + frame)
            data, sender = receiver.recvfrom(100)
        assert (data, sender) == (b"from the VM side", (POD_IP, UDP_PORT))
    finally:
        attachment.close_fds()
        run(network.detach(record))


def test_every_link_gets_its_own_tap(pair, tmp_path):
    sh("ip", "link", "add", "net1", "netns", pair.pod, "type", "veth",
       "peer", "name", "net1", "netns", pair.peer)
    sh("ip", "-n", pair.pod, "addr", "add", "192.0.2.129/25", "dev", "net1")
    for ns in (pair.pod, pair.peer):
        sh("ip", "-n", ns, "link", "set", "net1", "up")
    # a gateway outside every subnet, as Calico routes: the guest needs RTNH_F_ONLINK too
    sh("ip", "-n", pair.pod, "route", "add", "198.51.100.0/24", "via", "169.254.1.1", "dev",
       "net1", "onlink")
    before = pair.snapshot(pair.pod)
    record = tmp_path / "network.json"
    attachment = run(network.attach(pair.pod_path, 1, record))
    try:
        assert [(nic.id, nic.mac) for nic in attachment.nics] == [
            ("tap0_vmm", pair.mac(pair.pod, "eth0")), ("tap1_vmm", pair.mac(pair.pod, "net1"))]
        assert (mirred_targets(pair, "eth0"), mirred_targets(pair, "net1")) == (["tap0_vmm"], ["tap1_vmm"])
        assert (mirred_targets(pair, "tap0_vmm"), mirred_targets(pair, "tap1_vmm")) == (["eth0"], ["net1"])
        routes = network.routes_request(attachment.network).routes
        assert {(r.dest, r.device) for r in routes} >= {("192.0.2.0/24", "eth0"), ("192.0.2.128/25", "net1")}
        assert {(r.dest, r.gateway, r.flags) for r in routes if r.flags} == {
            ("198.51.100.0/24", "169.254.1.1", 4)}
    finally:
        attachment.close_fds()
        run(network.detach(record))
    assert pair.snapshot(pair.pod) == before


def test_single_queue_tap_without_multiqueue(pair, tmp_path):
    record = tmp_path / "network.json"
    attachment = run(network.attach(pair.pod_path, 1, record))
    try:
        assert len(attachment.nics[0].fds) == 1
        assert "multi_queue" not in sh("ip", "-n", pair.pod, "-d", "link", "show", "tap0_vmm")
    finally:
        attachment.close_fds()
        run(network.detach(record))


def test_missing_namespace_is_a_clear_error(tmp_path):
    record = tmp_path / "network.json"
    with pytest.raises(network.NetworkError, match="/var/run/netns/vmmt-absent does not exist"):
        run(network.attach("/var/run/netns/vmmt-absent", 1, record))
    assert not record.exists()
    assert not os.path.exists("/var/run/netns/vmmt-absent")  # not created on the way


def test_unsupported_interface_type_refused_and_nothing_left(pair, tmp_path):
    sh("ip", "-n", pair.pod, "link", "add", "br0", "type", "bridge")
    before = pair.snapshot(pair.pod)
    record = tmp_path / "network.json"
    with pytest.raises(network.NetworkError, match="interface br0 is of type bridge"):
        run(network.attach(pair.pod_path, 1, record))
    assert pair.snapshot(pair.pod) == before
    assert not record.exists()


def test_foreign_ingress_qdisc_refused_and_kept(pair, tmp_path):
    sh("tc", "-n", pair.pod, "qdisc", "add", "dev", "eth0", "ingress")
    before = pair.snapshot(pair.pod)
    with pytest.raises(network.NetworkError, match="eth0 already has an ingress qdisc"):
        run(network.attach(pair.pod_path, 1, tmp_path / "network.json"))
    assert pair.snapshot(pair.pod) == before


CRASHING_DAEMON = textwrap.dedent("""
    import asyncio, os, signal, sys
    from host_sandboxer import network
    attachment = asyncio.run(network.attach(sys.argv[1], 2, __import__("pathlib").Path(sys.argv[2])))
    print("attached", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_detach_from_the_record_after_a_crash(pair, tmp_path):
    """A daemon killed while it holds the taps: a new process cleans up from the record."""
    before = pair.snapshot(pair.pod)
    record = tmp_path / "network.json"
    child = subprocess.run([sys.executable, "-c", CRASHING_DAEMON, pair.pod_path, str(record)],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL and "attached" in child.stdout, child.stderr
    assert record.exists()
    assert mirred_targets(pair, "eth0")  # the filter outlived its tap
    run(network.detach(record))
    assert pair.snapshot(pair.pod) == before


def test_detach_after_the_cni_deleted_the_namespace(tmp_path):
    record = tmp_path / "network.json"
    with NetnsPair() as p:
        attachment = run(network.attach(p.pod_path, 1, record))
        attachment.close_fds()
    run(network.detach(record))
    assert not record.exists()


def test_cancelled_attach_leaves_nothing(pair, tmp_path):
    """Start cancelled while the namespace thread works: it is let finish, then undone."""
    before = pair.snapshot(pair.pod)
    record = tmp_path / "network.json"

    async def cancel_early():
        task = asyncio.ensure_future(network.attach(pair.pod_path, 2, record))
        await asyncio.sleep(0)  # the thread has started; cancel before it is done
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    run(cancel_early())
    assert pair.snapshot(pair.pod) == before
    assert not record.exists()
