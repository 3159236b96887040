"""The host→guest spec rewrite on a config.json shaped like the one containerd's CRI writes."""

import pytest

from host_sandboxer.taskproxy.spec_rewrite import SpecError, drop_missing_pod_files, reopen_submounts, rewrite_spec

POD_NS = {"ipc": "/run/sandbox-ns/ipc", "uts": "/run/sandbox-ns/uts", "pid": "/run/sandbox-ns/pid"}


def cri_spec(pid_path="/proc/4242/ns/pid"):
    namespaces = [
        {"type": "pid", "path": pid_path} if pid_path else {"type": "pid"},
        {"type": "ipc", "path": "/proc/4242/ns/ipc"},
        {"type": "uts", "path": "/proc/4242/ns/uts"},
        {"type": "mount"},
        {"type": "network", "path": "/proc/4242/ns/net"},
        {"type": "cgroup"},
    ]
    return {
        "ociVersion": "1.3.0",
        "process": {"args": ["sh"], "cwd": "/", "apparmorProfile": "cri-containerd.apparmor.d"},
        "root": {"path": "rootfs"},
        "hooks": {"createRuntime": [{"path": "/usr/bin/host-hook"}]},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid"]},
            {"destination": "/etc/hosts", "type": "bind",
             "source": "/var/lib/containerd/sandboxes/p1/hosts", "options": ["rbind", "rprivate", "rw"]},
            {"destination": "/data", "source": "/srv/data", "options": ["rbind", "ro"]},
        ],
        "linux": {
            "cgroupsPath": "/k8s.io/c1",
            "namespaces": namespaces,
            "resources": {"cpu": {"shares": 2, "cpus": "0-1", "mems": "0"}},
        },
    }


def test_host_namespaces_become_pod_namespaces_and_network_is_dropped():
    out = rewrite_spec(cri_spec(), "c1", POD_NS).spec
    assert out["linux"]["namespaces"] == [
        {"type": "pid", "path": "/run/sandbox-ns/pid"},
        {"type": "ipc", "path": "/run/sandbox-ns/ipc"},
        {"type": "uts", "path": "/run/sandbox-ns/uts"},
        {"type": "mount"},
        {"type": "cgroup"},
    ]


def test_container_pid_namespace_without_path_stays_private():
    out = rewrite_spec(cri_spec(pid_path=None), "c1", dict(POD_NS, pid=None)).spec
    assert {"type": "pid"} in out["linux"]["namespaces"]


def test_joining_a_pod_pid_namespace_the_pod_lacks_is_rejected():
    with pytest.raises(SpecError, match="pod pid namespace"):
        rewrite_spec(cri_spec(), "c1", dict(POD_NS, pid=None))


def test_joining_another_host_namespace_is_rejected():
    spec = cri_spec()
    spec["linux"]["namespaces"].append({"type": "user", "path": "/proc/1/ns/user"})
    with pytest.raises(SpecError, match="host user namespace"):
        rewrite_spec(spec, "c1", POD_NS)


def test_cgroups_path_cpuset_hooks_and_apparmor_are_made_guest_safe():
    out = rewrite_spec(cri_spec(), "c1", POD_NS).spec
    assert out["linux"]["cgroupsPath"] == "/vmm-task/c1"
    assert out["linux"]["resources"]["cpu"] == {"shares": 2}
    assert "hooks" not in out
    assert "apparmorProfile" not in out["process"]
    assert out["root"]["path"] == "rootfs"


def test_bind_sources_move_to_the_shared_dir_and_are_listed_for_exposure():
    result = rewrite_spec(cri_spec(), "c1", POD_NS)
    mounts = result.spec["mounts"]
    assert mounts[0]["source"] == "proc"
    assert mounts[1]["source"] == "/run/kuasar/state/c1/mounts/1"
    assert mounts[2]["source"] == "/run/kuasar/state/c1/mounts/2"
    assert [(e.host_source, e.shared_path, e.options) for e in result.exposures] == [
        ("/var/lib/containerd/sandboxes/p1/hosts", "c1/mounts/1", ("rbind", "rprivate", "rw")),
        ("/srv/data", "c1/mounts/2", ("rbind", "ro")),
    ]


def test_input_spec_is_not_modified():
    spec = cri_spec()
    rewrite_spec(spec, "c1", POD_NS)
    assert spec == cri_spec()


@pytest.mark.parametrize("bad", [
    [],
    {"mounts": [{"destination": "/x", "type": "bind", "source": "relative/path"}]},
    {"linux": {"namespaces": [{"path": "/proc/1/ns/ipc"}]}},
])
def test_malformed_specs_raise_spec_error(bad):
    with pytest.raises(SpecError):
        rewrite_spec(bad, "c1", POD_NS)


def test_missing_cri_pod_files_give_way_to_the_guest_ones():
    spec = cri_spec()
    spec["mounts"].append({"destination": "/dev/shm", "type": "bind", "source": "/run/cri/p1/shm",
                           "options": ["rbind", "rw"]})
    result = rewrite_spec(spec, "c1", POD_NS)
    hosts, data, shm = result.exposures
    unresolved = drop_missing_pod_files(result.spec, [hosts, shm, data])
    assert unresolved == [data]  # a real volume that is missing stays an error
    destinations = {m["destination"]: m for m in result.spec["mounts"]}
    assert "/etc/hosts" not in destinations
    assert destinations["/dev/shm"]["type"] == "tmpfs"
    assert destinations["/data"]["source"] == "/run/kuasar/state/c1/mounts/2"


def test_submounts_of_a_ro_bind_get_writable_binds_of_their_own_right_after_it():
    result = rewrite_spec(cri_spec(), "c1", POD_NS)
    data = result.exposures[1]
    reopen_submounts(result.spec, data, ["tmpfs", "tmpfs/deeper"])
    assert [(m["destination"], m["source"], m.get("options")) for m in result.spec["mounts"][2:5]] == [
        ("/data", "/run/kuasar/state/c1/mounts/2", ["rbind", "ro"]),
        ("/data/tmpfs", "/run/kuasar/state/c1/mounts/2/tmpfs", ["rbind", "rw"]),
        ("/data/tmpfs/deeper", "/run/kuasar/state/c1/mounts/2/tmpfs/deeper", ["rbind", "rw"]),
    ]
