"""The pod's network as the guest agent takes it: grpc.SandboxService UpdateInterfaces and
UpdateRoutes messages (Kuasar's sandbox.proto).  The guest finds each interface by MAC: the
virtio-net device carries the MAC of the pod link it replaces."""
from __future__ import annotations

import socket

from host_sandboxer.network.inspect import PodNetwork
from vmm_common.protos.kuasar import sandbox_pb2 as pb


def _family(family: int) -> int:
    return pb.IPFamily.v6 if family == socket.AF_INET6 else pb.IPFamily.v4


def interfaces_request(network: PodNetwork) -> pb.UpdateInterfacesRequest:
    return pb.UpdateInterfacesRequest(interfaces=[
        pb.Interface(device=link.name, name=link.name, hwAddr=link.mac, mtu=link.mtu,
                     type=link.kind, raw_flags=link.flags,
                     IPAddresses=[pb.IPAddress(family=_family(a.family), address=a.address,
                                               mask=str(a.prefixlen)) for a in link.addresses])
        for link in network.links])


def routes_request(network: PodNetwork) -> pb.UpdateRoutesRequest:
    return pb.UpdateRoutesRequest(routes=[
        pb.Route(dest=r.dest, gateway=r.gateway, device=r.device, source=r.source,
                 scope=r.scope, family=_family(r.family), flags=r.flags)
        for r in network.routes])
