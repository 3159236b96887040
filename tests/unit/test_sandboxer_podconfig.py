"""PodSandboxConfig fields read by the daemon, encoded by the protobuf library itself.

The messages are declared here with cri-api runtime.v1's field numbers (a subset), so the
bytes come from protobuf's own encoder, not from a mirror of the reader under test.
"""

import os

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from host_sandboxer.config import VmConfig
from host_sandboxer.sandbox.podconfig import PodConfig, PodConfigError, parse_pod_config

TYPE_URL = "type.googleapis.com/runtime.v1.PodSandboxConfig"


def _messages():
    f = descriptor_pb2.FileDescriptorProto(name="cri_subset_test.proto", package="runtime.v1",
                                           syntax="proto3")
    T = descriptor_pb2.FieldDescriptorProto

    def msg(name, *specs):
        """`specs`: (name, number, type, type name[, label]); optional unless a label is given."""
        m = f.message_type.add(name=name)
        for fname, number, ftype, type_name, *label in specs:
            m.field.add(name=fname, number=number, type=ftype, type_name=type_name,
                        label=label[0] if label else T.LABEL_OPTIONAL)

    msg("IDMapping", ("host_id", 1, T.TYPE_UINT32, None), ("container_id", 2, T.TYPE_UINT32, None),
        ("length", 3, T.TYPE_UINT32, None))
    msg("UserNamespace", ("mode", 1, T.TYPE_INT32, None),
        ("uids", 2, T.TYPE_MESSAGE, ".runtime.v1.IDMapping", T.LABEL_REPEATED),
        ("gids", 3, T.TYPE_MESSAGE, ".runtime.v1.IDMapping", T.LABEL_REPEATED))
    msg("NamespaceOption", ("network", 1, T.TYPE_INT32, None), ("pid", 2, T.TYPE_INT32, None),
        ("userns_options", 5, T.TYPE_MESSAGE, ".runtime.v1.UserNamespace"))
    msg("LinuxSandboxSecurityContext",
        ("namespace_options", 1, T.TYPE_MESSAGE, ".runtime.v1.NamespaceOption"))
    msg("LinuxContainerResources", ("cpu_period", 1, T.TYPE_INT64, None),
        ("cpu_quota", 2, T.TYPE_INT64, None), ("memory_limit_in_bytes", 4, T.TYPE_INT64, None))
    msg("LinuxPodSandboxConfig", ("cgroup_parent", 1, T.TYPE_STRING, None),
        ("security_context", 2, T.TYPE_MESSAGE, ".runtime.v1.LinuxSandboxSecurityContext"),
        ("resources", 5, T.TYPE_MESSAGE, ".runtime.v1.LinuxContainerResources"))
    msg("PodSandboxConfig", ("hostname", 2, T.TYPE_STRING, None),
        ("log_directory", 3, T.TYPE_STRING, None),
        ("linux", 8, T.TYPE_MESSAGE, ".runtime.v1.LinuxPodSandboxConfig"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("runtime.v1.PodSandboxConfig"))


PodSandboxConfig = _messages()


def test_hostname_pid_mode_and_resources():
    cfg = PodSandboxConfig(hostname="web-0", log_directory="/var/log/pods/x")
    cfg.linux.cgroup_parent = "/kubepods"
    cfg.linux.security_context.namespace_options.pid = 1  # CONTAINER
    cfg.linux.resources.cpu_period = 100000
    cfg.linux.resources.cpu_quota = 250000
    cfg.linux.resources.memory_limit_in_bytes = 256 * 1024 * 1024 + 1
    pod = parse_pod_config(TYPE_URL, cfg.SerializeToString())
    assert pod.hostname == "web-0"
    assert not pod.shared_pid
    assert pod.cgroup_parent == "/kubepods"
    vm = VmConfig(cpus=1, max_cpus=4, memory_mib=512)
    assert pod.vcpus(vm) == 3
    assert pod.memory_mib(vm) == 512 + 257
    assert pod.clamped(vm) == ""


def test_absent_pid_mode_means_pod_shared_and_defaults_apply():
    pod = parse_pod_config(TYPE_URL, PodSandboxConfig(hostname="h").SerializeToString())
    assert pod.shared_pid
    assert pod.cgroup_parent == ""
    assert (pod.vcpus(VmConfig(cpus=2)), pod.memory_mib(VmConfig(memory_mib=256))) == (2, 256)


def test_limits_beyond_the_maxima_are_clamped_and_said():
    pod = PodConfig(cpu_period=100_000, cpu_quota=64 * 100_000, memory_limit=100 << 30)
    vm = VmConfig(cpus=1, max_cpus=2, memory_mib=512, max_memory_mib=2048)
    assert (pod.vcpus(vm), pod.memory_mib(vm)) == (2, 2048)
    assert pod.clamped(vm) == "64 vCPUs to 2 (vm.max_cpus), 102912 MiB to 2048 (vm.max_memory_mib)"
    # Unset maxima: the host's CPUs and RAM, never below the configured defaults.
    unset = VmConfig(cpus=1, memory_mib=512)
    host_mib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
    assert (pod.vcpus(unset), pod.memory_mib(unset)) == (os.cpu_count(), host_mib)
    assert PodConfig().vcpus(VmConfig(cpus=3, max_cpus=2)) == 3


def test_other_option_types_are_tolerated_not_decoded():
    pod = parse_pod_config("type.googleapis.com/containerd.runc.v1.Options", b"\xff\xff")
    assert pod.hostname == "" and not pod.shared_pid


def test_truncated_bytes_are_a_clear_error():
    data = PodSandboxConfig(hostname="web-0").SerializeToString()
    with pytest.raises(PodConfigError, match="past the end"):
        parse_pod_config(TYPE_URL, data[:-2])


def test_user_namespace_options_are_read():
    """The daemon refuses what a runc pod is refused for at Create (vmm_common/userns.py, whose
    rules tests/unit/test_agent_podconfig.py checks): it must read the options as the agent does."""
    cfg = PodSandboxConfig()
    options = cfg.linux.security_context.namespace_options.userns_options
    options.mode = 1  # CONTAINER
    options.uids.add(host_id=1000, container_id=0, length=65536)
    options.uids.add(host_id=3000, container_id=65536, length=1)
    options.gids.add(host_id=2000, container_id=0, length=100)
    userns = parse_pod_config(TYPE_URL, cfg.SerializeToString()).userns
    assert (userns.mode, userns.uids, userns.gids) == \
        (1, [(0, 1000, 65536), (65536, 3000, 1)], [(0, 2000, 100)])
    cfg.linux.security_context.namespace_options.userns_options.Clear()  # set, all defaults: POD
    assert parse_pod_config(TYPE_URL, cfg.SerializeToString()).userns.mode == 0
    assert parse_pod_config(TYPE_URL, PodSandboxConfig().SerializeToString()).userns is None
