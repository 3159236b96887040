"""The pod's netns_path from Controller.Create survives in the pod record, so a restarted
daemon's Shutdown still knows the namespace whose links it must give back."""
import asyncio

from google.protobuf import any_pb2

from host_sandboxer.config import Config, ContainmentConfig
from host_sandboxer.sandbox.manager import Sandboxes
from host_sandboxer.sandbox.statedir import StateDir

CONFIG = Config(containment=ContainmentConfig(cgroups=False))


def test_netns_path_is_recorded_and_recovered(tmp_path):
    async def scenario():
        state = StateDir(tmp_path)
        Sandboxes(state, CONFIG, None).create("p1", "k8s.io", any_pb2.Any(), "/var/run/netns/cni-1")
        Sandboxes(state, CONFIG, None).create("hostnet", "k8s.io", any_pb2.Any())
        recovered = Sandboxes(state, CONFIG, None)
        await recovered.recover()
        return {pid: pod.netns_path for pid, pod in recovered.pods.items()}
    assert asyncio.run(scenario()) == {"p1": "/var/run/netns/cni-1", "hostnet": ""}
