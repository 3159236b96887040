"""What the host collects from a pod namespace, as the guest's UpdateInterfaces/UpdateRoutes."""
import socket

from host_sandboxer.network.inspect import PodAddress, PodLink, PodNetwork, PodRoute
from host_sandboxer.network.messages import interfaces_request, routes_request
from vmm_common.protos.kuasar import sandbox_pb2 as pb

NETWORK = PodNetwork(
    links=(PodLink(index=2, name="eth0", kind="veth", mac="aa:bb:cc:dd:ee:01", mtu=1450,
                   flags=0x1043 | 0x80,
                   addresses=(PodAddress("192.0.2.1", 24, socket.AF_INET),
                              PodAddress("2001:db8::1", 64, socket.AF_INET6))),),
    routes=(PodRoute("", "192.0.2.254", "eth0", "", 0, socket.AF_INET, flags=4),
            PodRoute("192.0.2.0/24", "", "eth0", "192.0.2.1", 253, socket.AF_INET),
            PodRoute("2001:db8::/64", "", "eth0", "", 0, socket.AF_INET6)))


def test_interfaces_carry_mac_mtu_flags_and_addresses_with_prefix_masks():
    (iface,) = interfaces_request(NETWORK).interfaces
    assert (iface.name, iface.device, iface.hwAddr, iface.mtu, iface.type) == \
        ("eth0", "eth0", "aa:bb:cc:dd:ee:01", 1450, "veth")
    assert iface.raw_flags & 0x80  # IFF_NOARP reaches the guest
    assert [(a.family, a.address, a.mask) for a in iface.IPAddresses] == [
        (pb.IPFamily.v4, "192.0.2.1", "24"), (pb.IPFamily.v6, "2001:db8::1", "64")]


def test_routes_keep_default_gateway_scope_source_family_and_onlink():
    routes = routes_request(NETWORK).routes
    assert [(r.dest, r.gateway, r.device, r.source, r.scope, r.family, r.flags)
            for r in routes] == [
        ("", "192.0.2.254", "eth0", "", 0, pb.IPFamily.v4, 4),
        ("192.0.2.0/24", "", "eth0", "192.0.2.1", 253, pb.IPFamily.v4, 0),
        ("2001:db8::/64", "", "eth0", "", 0, pb.IPFamily.v6, 0)]


def test_messages_survive_the_wire():
    request = interfaces_request(NETWORK)
    assert pb.UpdateInterfacesRequest.FromString(request.SerializeToString()) == request
    assert len(routes_request(PodNetwork((), ())).routes) == 0
