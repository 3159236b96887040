"""Config file parsing: defaults, overrides, path resolution, and errors that name the key."""
import re
from pathlib import Path

import pytest

from host_sandboxer import config
from host_sandboxer.config import DEFAULT_IMAGE_DIR, Config, ConfigError, boot_image, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vmm.toml"
    path.write_text(text)
    return path


def test_no_file_gives_defaults_pointing_at_build_guest():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.vm.kernel == DEFAULT_IMAGE_DIR / "kernel" and cfg.vm.initrd == DEFAULT_IMAGE_DIR / "initrd.img"
    assert DEFAULT_IMAGE_DIR.parts[-2:] == ("build", "guest")
    assert (cfg.vm.machine, cfg.vm.accel, cfg.sharefs.type, cfg.vsock.transport) == ("q35", "auto", "virtiofs", "auto")


def test_the_default_virtiofsd_is_the_one_this_debian_release_has(tmp_path, monkeypatch):
    """Debian 12 has QEMU's C virtiofsd, Debian 13 only the Rust one in /usr/libexec."""
    c_daemon, rust_daemon = tmp_path / "lib-qemu-virtiofsd", tmp_path / "libexec-virtiofsd"
    monkeypatch.setattr(config, "VIRTIOFSD_PATHS", (c_daemon, rust_daemon))
    assert Config().sharefs.virtiofsd == c_daemon  # neither: the first, named in the error later
    rust_daemon.touch()
    assert Config().sharefs.virtiofsd == rust_daemon
    c_daemon.touch()
    assert Config().sharefs.virtiofsd == c_daemon


def test_values_override_and_relative_paths_follow_the_file(tmp_path):
    cfg = load_config(write(tmp_path, """
        [vm]
        machine = "microvm"
        accel = "tcg"
        cpus = 2
        memory_mib = 256
        kernel = "img/kernel"
        initrd = "/abs/initrd.img"
        boot_timeout_s = 12
        [sharefs]
        type = "9p"
        [vsock]
        transport = "hybrid"
        [agent]
        debug = true
        log_level = "debug"
    """))
    assert cfg.vm.machine == "microvm" and cfg.vm.cpus == 2 and cfg.vm.memory_mib == 256
    assert cfg.vm.kernel == tmp_path / "img" / "kernel"
    assert cfg.vm.initrd == Path("/abs/initrd.img")
    assert cfg.vm.boot_timeout_s == 12.0 and isinstance(cfg.vm.boot_timeout_s, float)
    assert cfg.sharefs.type == "9p" and cfg.sharefs.cache == "auto"  # untouched keys keep defaults
    assert cfg.vsock.transport == "hybrid"
    assert cfg.agent.debug is True and cfg.agent.port == 1024


@pytest.mark.parametrize("text, message", [
    ('[vm]\nmachine = "pc"\n', "vm.machine = 'pc': must be one of 'q35', 'microvm'"),
    ('[vm]\ncpus = 0\n', "vm.cpus = 0: must be a positive integer"),
    ('[vm]\ncpus = "2"\n', "vm.cpus = '2': must be a positive integer"),
    ('[vm]\nmemory_mib = true\n', "vm.memory_mib = True: must be a positive integer"),
    ('[vm]\nkernel = 3\n', "vm.kernel = 3: must be a non-empty path string"),
    ('[agent]\ndebug = "yes"\n', "agent.debug = 'yes': must be true or false"),
    ('[vm]\nkernal = "x"\n', "unknown key(s) in [vm]: kernal"),
    ('[network]\nx = 1\n', "unknown key(s) in top level: network"),
    ('vm = 3\n', "vm = 3: must be a table"),
    ('[vm\n', "not valid TOML"),
    ('[containment]\ncgroup_parent = "/kubepods/../etc"\n', "[containment] cgroup parent '/kubepods/../etc'"),
    ('[containment]\nvmm_uid_base = 4294967000\n', "[containment] vmm uid range [4294967000, 4295032536)"),
    ('[containment]\nbackend_uid = 2000000001\n', "[containment] backend_uid 2000000001 must lie within [1, "
                                                   "4294967294] and outside the vmm uid range"),
])
def test_errors_name_the_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config: No such file"):
        load_config(tmp_path / "absent.toml")


def test_kuasar_hypervisor_names_map_onto_our_sections(tmp_path):
    cfg = load_config(write(tmp_path, """
        [hypervisor]
        path = "/usr/bin/qemu-system-x86_64"
        kernel_path = "k/vmlinux"
        initrd_path = "/var/lib/kuasar/initrd.img"
        kernel_params = "quiet"
        vcpus = 2
        memory_in_mb = 1024
        share_fs = "9p"
        vsock = "hybrid"
        accel = "tcg"
        [containerd]
        address = "/run/containerd/containerd.sock"
    """))
    assert cfg.vm.qemu == "/usr/bin/qemu-system-x86_64"
    assert cfg.vm.kernel == tmp_path / "k" / "vmlinux"
    assert cfg.vm.initrd == Path("/var/lib/kuasar/initrd.img")
    assert (cfg.vm.kernel_params, cfg.vm.cpus, cfg.vm.memory_mib, cfg.vm.accel) == ("quiet", 2, 1024, "tcg")
    assert (cfg.sharefs.type, cfg.vsock.transport) == ("9p", "hybrid")


def test_the_boot_image_is_pmem_on_q35_and_the_initrd_on_microvm_unless_named(tmp_path):
    assert Config().vm.image == "auto"
    assert boot_image(Config().vm) == "pmem"
    assert boot_image(load_config(write(tmp_path, '[vm]\nmachine = "microvm"\n')).vm) == "initrd"
    assert boot_image(load_config(write(tmp_path, '[vm]\nimage = "initrd"\n')).vm) == "initrd"


def test_the_boot_image_is_chosen_by_name_and_pmem_needs_q35(tmp_path):
    cfg = load_config(write(tmp_path, """
        [hypervisor]
        image = "pmem"
        image_path = "img/rootfs.img"
    """))
    assert (cfg.vm.image, cfg.vm.rootfs) == ("pmem", tmp_path / "img" / "rootfs.img")
    with pytest.raises(ConfigError, match=re.escape('vm.image = "pmem" needs vm.machine = "q35"')):
        load_config(write(tmp_path, '[vm]\nimage = "pmem"\nmachine = "microvm"\n'))
    with pytest.raises(ConfigError, match="vm.image = 'dax': must be one of"):
        load_config(write(tmp_path, '[vm]\nimage = "dax"\n'))


@pytest.mark.parametrize("text, message", [
    ('[hypervisor]\nvcpus = 2\n[vm]\ncpus = 4\n', "hypervisor.vcpus and vm.cpus both set"),
    ('[hypervisor]\nhugepages = true\n', "unknown key(s) in [hypervisor]: hugepages"),
    ('[hypervisor]\nshare_fs = "nfs"\n', "sharefs.type = 'nfs': must be one of"),
])
def test_kuasar_names_are_checked_like_ours(tmp_path, text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, text))


def test_containment_is_on_by_default_and_can_be_set(tmp_path):
    default = Config().containment
    assert (default.cgroups, default.seccomp, default.vmm_user) == (True, True, True)
    assert default.cgroup_parent == "/vmm-sandboxer"
    cfg = load_config(write(tmp_path, """
        [containment]
        cgroups = false
        cgroup_parent = "vmm.slice"
        vmm_uid_base = 300000
        vmm_uids = 10
        [vm]
        max_memory_mib = 4096
        [sharefs]
        tmpfs_size_mib = 8
        tmpfs_inodes = 1000
    """))
    assert (cfg.containment.cgroups, cfg.containment.cgroup_parent) == (False, "vmm.slice")
    assert (cfg.containment.vmm_uid_base, cfg.containment.vmm_uids) == (300000, 10)
    assert (cfg.vm.max_memory_mib, cfg.sharefs.tmpfs_size_mib, cfg.sharefs.tmpfs_inodes) == (4096, 8, 1000)


def test_templates_are_off_by_default_and_need_q35_virtiofs_and_hybrid_vsock(tmp_path):
    assert Config().vm.template is False
    assert load_config(write(tmp_path, "[hypervisor]\ntemplate = true\n")).vm.template is True
    for text, message in (('[vm]\ntemplate = true\nmachine = "microvm"\nimage = "initrd"\n',
                           "vm.template = true needs vm.machine = 'q35', not 'microvm'"),
                          ('[vm]\ntemplate = true\n[sharefs]\ntype = "9p"\n',
                           "vm.template = true needs sharefs.type = 'virtiofs', not '9p'"),
                          ('[vm]\ntemplate = true\n[vsock]\ntransport = "kernel"\n',
                           "vm.template = true needs vsock.transport = 'hybrid', not 'kernel'")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(write(tmp_path, text))
