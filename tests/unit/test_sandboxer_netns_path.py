"""Controller.Create's netns_path must be a pod's own network namespace: never the daemon's or
the host's (Start would move their interfaces into the VM), never another kind of file.
Real namespaces: one made with `ip netns add` (root), the daemon's and PID 1's."""
import os
import subprocess
import uuid

import grpc
import pytest

from host_sandboxer.sandbox.netns_path import check_netns_path
from host_sandboxer.taskproxy.errors import HostError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


@pytest.fixture
def pod_netns():
    name = f"vsb-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield f"/run/netns/{name}"
    subprocess.run(["ip", "netns", "del", name], check=True)


def refusal(path: str) -> str:
    with pytest.raises(HostError) as info:
        check_netns_path(path)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message.startswith(f"netns_path {path!r}: ")
    return info.value.message


def test_a_pods_own_network_namespace_and_the_host_network_pass(pod_netns):
    check_netns_path(pod_netns)
    check_netns_path("")  # host network: no namespace is touched


def test_the_hosts_and_the_daemons_namespaces_are_refused_under_any_name():
    # PID 1's: compared when the daemon may look at PID 1 (here it may not even open it)
    assert refusal("/proc/1/ns/net").endswith(("is the host's network namespace (PID 1's)",
                                               "Permission denied"))
    assert refusal(f"/proc/{os.getpid()}/ns/net").endswith("is the daemon's own network namespace")
    alias = f"vsb-{uuid.uuid4().hex[:8]}"  # a named netns that is the daemon's own, bind-mounted
    subprocess.run(["ip", "netns", "attach", alias, str(os.getpid())], check=True)
    try:
        assert refusal(f"/run/netns/{alias}").endswith("is the daemon's own network namespace")
    finally:
        subprocess.run(["ip", "netns", "del", alias], check=True)


def test_other_files_are_refused_naming_what_they_are(tmp_path):
    (tmp_path / "file").write_text("")
    assert refusal(str(tmp_path / "file")).endswith("not a namespace file")
    assert "a namespace of another type (0x20000), not a network namespace" in refusal("/proc/self/ns/mnt")
    assert refusal(str(tmp_path / "missing")).endswith("No such file or directory")
    os.mkfifo(tmp_path / "fifo")  # opened without waiting for a writer
    assert refusal(str(tmp_path / "fifo")).endswith("not a namespace file")
