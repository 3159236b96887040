"""SetupSandbox's pod config: CRI protobuf bytes and Kuasar's JSON; the files made from it."""

import json

import pytest

from vmm_task.pod import files
from vmm_task.pod.podconfig import CRI_TYPE, PodConfig, decode
from vmm_task.pod.setup import decode_config


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2), lengths < 128."""
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def cri_pod_config(pid_mode: int | None) -> bytes:
    """runtime.v1.PodSandboxConfig as kubelet sends it, written field by field with CRI's
    numbers, including fields the agent ignores (metadata=1, log_directory=3, labels=6)."""
    metadata = _field(1, b"pod-name") + _field(3, b"uid-1")
    dns = _field(1, b"10.96.0.10") + _field(2, b"svc.cluster.local") + _field(3, b"ndots:5")
    namespace_options = b"" if pid_mode is None else bytes([2 << 3, pid_mode])  # pid = 2 varint
    security = _field(1, namespace_options)
    sysctl = _field(1, b"kernel.shmmni") + _field(2, b"8192")
    linux = _field(1, b"/kubepods") + _field(2, security) + _field(3, sysctl)
    return (_field(1, metadata) + _field(2, b"web-0") + _field(3, b"/var/log/pods/x")
            + _field(4, dns) + _field(6, _field(1, b"app") + _field(2, b"web")) + _field(8, linux))


def test_cri_protobuf_with_unknown_fields():
    config = decode("type.googleapis.com/runtime.v1.PodSandboxConfig", cri_pod_config(1))
    assert config.hostname == "web-0"
    assert (config.dns_servers, config.dns_searches, config.dns_options) == \
        (["10.96.0.10"], ["svc.cluster.local"], ["ndots:5"])
    assert config.sysctls == {"kernel.shmmni": "8192"}
    assert config.share_pid is False  # CONTAINER


def test_cri_pid_mode_pod_or_absent_means_shared():
    assert decode("runtime.v1.PodSandboxConfig", cri_pod_config(0)).share_pid
    assert decode("runtime.v1.PodSandboxConfig", cri_pod_config(None)).share_pid


def test_kuasar_json_snake_and_camel_case():
    snake = {"hostname": "h1", "dns_config": {"servers": ["1.1.1.1"]},
             "linux": {"sysctls": {"net.ipv4.ip_forward": "1"},
                       "security_context": {"namespace_options": {"pid": 1}}}}
    camel = {"hostname": "h1", "dnsConfig": {"servers": ["1.1.1.1"]},
             "linux": {"sysctls": {"net.ipv4.ip_forward": "1"},
                       "securityContext": {"namespaceOptions": {"pid": "CONTAINER"}}}}
    for document in (snake, camel):
        config = decode("PodSandboxConfig", json.dumps(document).encode())
        assert (config.hostname, config.dns_servers, config.share_pid) == ("h1", ["1.1.1.1"], False)
        assert config.sysctls == {"net.ipv4.ip_forward": "1"}


def test_empty_config_means_defaults():
    config = decode("", b"")
    assert (config.hostname, config.share_pid, config.has_dns) == ("", False, False)


@pytest.mark.parametrize("type_url, value, problem", [
    ("example.com/Other", b"", "unsupported sandbox config type"),
    ("runtime.v1.PodSandboxConfig", b"\x12\xff", "undecodable"),
    ("PodSandboxConfig", b"{not json", "undecodable"),
    ("PodSandboxConfig", b'{"dns_config": {"servers": [1]}}', "must hold strings"),
    ("PodSandboxConfig", b'{"hostname": "../../etc"}', "invalid hostname"),
    ("PodSandboxConfig", b'{"linux": {"sysctls": {"kernel..x": "1"}}}', "invalid sysctl"),
    ("PodSandboxConfig", b'{"linux": {"sysctls": {"../../../etc/passwd": "1"}}}', "invalid sysctl"),
])
def test_bad_configs_name_the_problem(type_url, value, problem):
    with pytest.raises(ValueError, match=problem):
        decode_config(type_url, value)


def test_sysctl_paths_in_dot_and_slash_form():
    assert files.sysctl_path("net.ipv4.ip_forward") == "/proc/sys/net/ipv4/ip_forward"
    assert files.sysctl_path("net/ipv4/conf/eth0.100/rp_filter") == \
        "/proc/sys/net/ipv4/conf/eth0.100/rp_filter"
    assert files.is_ipc_sysctl("kernel.shmmax") and files.is_ipc_sysctl("fs.mqueue.msg_max")
    assert not files.is_ipc_sysctl("kernel.pid_max")


def test_resolv_conf_and_hosts():
    config = PodConfig(dns_servers=["10.0.0.10", "10.0.0.11"], dns_searches=["a.local", "b"],
                       dns_options=["ndots:5"])
    assert files.resolv_conf(config) == ("search a.local b\nnameserver 10.0.0.10\n"
                                         "nameserver 10.0.0.11\noptions ndots:5\n")
    hosts = files.hosts("web-0", ["10.1.2.3"])
    assert hosts.startswith("127.0.0.1\tlocalhost\n") and hosts.endswith("10.1.2.3\tweb-0\n")
    assert files.hosts("", []) == files.DEFAULT_HOSTS


def _varint_field(number: int, value: int) -> bytes:
    """A varint field (wire type 0)."""
    out = bytearray([number << 3])
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def cri_userns_config(mode: int, uids: list[tuple[int, int, int]],
                      gids: list[tuple[int, int, int]]) -> bytes:
    """A PodSandboxConfig whose NamespaceOption (linux=8 > security_context=2 > namespace_options=1)
    carries userns_options=5: mode=1, uids=2, gids=3, each IDMapping host_id=1, container_id=2,
    length=3; mappings given as (container_id, host_id, length)."""
    def mapping(container_id, host_id, length):
        return _varint_field(1, host_id) + _varint_field(2, container_id) + _varint_field(3, length)
    userns = (_varint_field(1, mode) if mode else b"") \
        + b"".join(_field(2, mapping(*m)) for m in uids) + b"".join(_field(3, mapping(*m)) for m in gids)
    namespace_options = _varint_field(1, 0) + _field(5, userns)
    return _field(2, b"web-0") + _field(8, _field(2, _field(1, namespace_options)))


CRITEST_MAPPING = (0, 1000, 100000)  # cri-tools pkg/validate/security_context_linux.go


def test_cri_user_namespace_options():
    config = decode(CRI_TYPE, cri_userns_config(0, [CRITEST_MAPPING], [(0, 2000, 65536)]))
    assert (config.userns.mode, config.userns.uids, config.userns.gids) == \
        (0, [CRITEST_MAPPING], [(0, 2000, 65536)])
    assert decode(CRI_TYPE, cri_pod_config(0)).userns is None  # not set: the node's
    assert decode(CRI_TYPE, cri_userns_config(2, [], [])).userns.mode == 2


def test_kuasar_json_user_namespace_options():
    document = {"linux": {"securityContext": {"namespaceOptions": {"usernsOptions": {
        "mode": "POD", "uids": [{"containerId": 0, "hostId": 1000, "length": 100000}],
        "gids": [{"container_id": 0, "host_id": 1000, "length": 100000}]}}}}}
    config = decode("PodSandboxConfig", json.dumps(document).encode())
    assert (config.userns.mode, config.userns.uids, config.userns.gids) == \
        (0, [CRITEST_MAPPING], [CRITEST_MAPPING])


@pytest.mark.parametrize("mode, uids, gids", [
    (0, [CRITEST_MAPPING], [CRITEST_MAPPING]),  # "runtime should support NamespaceMode_POD"
    (0, [(0, 1000, 1)], [(0, 1000, 65536)]),
    (2, [], []),  # "runtime should support NamespaceMode_NODE"
])
def test_user_namespaces_a_runc_pod_accepts(mode, uids, gids):
    assert decode_config(CRI_TYPE, cri_userns_config(mode, uids, gids)).userns.mode == mode


@pytest.mark.parametrize("mode, uids, gids, refusal", [
    # critest "[sig-node] Security Context UserNamespaces": containerd's podsandbox controller
    # (parseUsernsIDs) and runc (HostUID) refuse these while the pod is made; so does the agent
    (1, [], [], 'user namespace configuration: unsupported user namespace mode: "CONTAINER"'),
    (3, [], [], 'user namespace configuration: unsupported user namespace mode: "TARGET"'),
    (0, [(1, 1000, 100000)], [(1, 1000, 100000)],
     "user namespaces enabled, but no mapping found for uid 0"),
    (0, [CRITEST_MAPPING, (0, 2000, 100000)], [CRITEST_MAPPING, (0, 2000, 100000)],
     "user namespace configuration: UID mapping: only one mapping line supported, got 2 mapping lines"),
    # and the rest of those two's rules
    (0, [CRITEST_MAPPING], [(1, 1000, 100000)], "user namespaces enabled, but no mapping found for gid 0"),
    (0, [(0, 1000, 0)], [CRITEST_MAPPING], "UID mapping: invalid mapping length: 0"),
    (0, [CRITEST_MAPPING], [], 'can\'t use user namespace mode "POD" without UID and GID mappings'),
    (2, [CRITEST_MAPPING], [], 'can\'t use user namespace mode "NODE" with mappings. '
                               "Got 1 UID mappings and 0 GID mappings"),
    (7, [], [], 'unsupported user namespace mode: "7"'),
])
def test_user_namespaces_a_runc_pod_refuses(mode, uids, gids, refusal):
    with pytest.raises(ValueError) as refused:
        decode_config(CRI_TYPE, cri_userns_config(mode, uids, gids))
    assert refusal in str(refused.value)
