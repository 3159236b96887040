"""The pod's netns_path from Controller.Create survives in the pod record, so a restarted
daemon's Shutdown still knows the namespace whose links it must give back."""
import asyncio
import os
import subprocess

import pytest
from google.protobuf import any_pb2

from host_sandboxer.config import Config, ContainmentConfig
from host_sandboxer.sandbox.manager import Sandboxes
from host_sandboxer.sandbox.statedir import StateDir

CONFIG = Config(containment=ContainmentConfig(cgroups=False))


@pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace needs root")
def test_netns_path_is_recorded_and_recovered(tmp_path):
    name = f"cni-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)

    async def scenario():
        state = StateDir(tmp_path)
        Sandboxes(state, CONFIG, None).create("p1", "k8s.io", any_pb2.Any(), f"/run/netns/{name}")
        Sandboxes(state, CONFIG, None).create("hostnet", "k8s.io", any_pb2.Any())
        recovered = Sandboxes(state, CONFIG, None)
        await recovered.recover()
        return {pid: pod.netns_path for pid, pod in recovered.pods.items()}
    try:
        assert asyncio.run(scenario()) == {"p1": f"/run/netns/{name}", "hostnet": ""}
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)
