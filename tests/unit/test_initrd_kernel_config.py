"""The kernel config merge: requests override the base, and a request the final .config dropped
is reported by name (the kernel build fails on it)."""
from kernel import config

BASE = """\
CONFIG_64BIT=y
# CONFIG_VSOCKETS is not set
CONFIG_NR_CPUS=8
CONFIG_LOCALVERSION=""
"""


def test_requests_replace_base_values_and_are_appended_once():
    merged = config.apply_requests(BASE, {"CONFIG_VSOCKETS": "y", "CONFIG_NR_CPUS": "64",
                                          "CONFIG_64BIT": "n"})
    options = config.parse_config(merged)
    assert options == {"CONFIG_64BIT": "n", "CONFIG_VSOCKETS": "y", "CONFIG_NR_CPUS": "64",
                       "CONFIG_LOCALVERSION": '""'}
    assert merged.count("CONFIG_VSOCKETS") == 1


def test_every_dropped_option_is_named():
    requests = {"CONFIG_VSOCKETS": "y", "CONFIG_VIRTIO_FS": "y", "CONFIG_64BIT": "y",
                "CONFIG_NR_CPUS": "64", "CONFIG_MODULES": "n"}
    final = BASE + "CONFIG_MODULES=y\n"  # as if olddefconfig dropped/changed these
    problems = config.missing_options(requests, final)
    assert problems == [
        "CONFIG_MODULES: requested n, final .config has y",
        "CONFIG_NR_CPUS: requested 64, final .config has 8",
        "CONFIG_VIRTIO_FS: requested y, final .config has n",
        "CONFIG_VSOCKETS: requested y, final .config has n",
    ]


def test_nothing_reported_when_every_request_is_kept():
    assert config.missing_options({"CONFIG_64BIT": "y", "CONFIG_VSOCKETS": "n"}, BASE) == []


def test_the_real_fragments_parse_and_ask_for_the_transports():
    requests = config.requested_options(config.fragment_paths())
    for name in ("CONFIG_VIRTIO_VSOCKETS", "CONFIG_VIRTIO_FS", "CONFIG_NET_9P_VIRTIO",
                 "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_BLK_DEV_INITRD"):
        assert requests[name] == "y"
    assert requests["CONFIG_MODULES"] == "n"
    # only the host may reach the agent's vsock ports: no guest-local (loopback) vsock
    assert requests["CONFIG_VSOCKETS_LOOPBACK"] == "n"


def test_the_fragments_ask_for_a_dax_root_on_virtio_pmem_and_free_page_reporting():
    """Checked against Kconfig once by hand (olddefconfig on linux-source-6.1): FS_DAX needs
    ZONE_DEVICE, which needs SPARSEMEM_VMEMMAP, which tinyconfig leaves off."""
    requests = config.requested_options(config.fragment_paths())
    for name in ("CONFIG_LIBNVDIMM", "CONFIG_BLK_DEV_PMEM", "CONFIG_VIRTIO_PMEM",
                 "CONFIG_SPARSEMEM_VMEMMAP", "CONFIG_ZONE_DEVICE", "CONFIG_FS_DAX",
                 "CONFIG_EROFS_FS", "CONFIG_VIRTIO_BALLOON", "CONFIG_PAGE_REPORTING"):
        assert requests[name] == "y", name


def test_a_source_packages_fragments_follow_the_common_ones_of_the_same_concern(tmp_path):
    for name, text in (("00-base.config", "CONFIG_A=y\n"), ("90-hotplug.config", "CONFIG_OLD=y\n"),
                       ("95-last.config", "CONFIG_B=y\n")):
        (tmp_path / name).write_text(text)
    (tmp_path / "linux-source-6.12").mkdir()
    (tmp_path / "linux-source-6.12" / "90-hotplug.config").write_text("CONFIG_OLD=n\nCONFIG_NEW=y\n")
    names = [p.relative_to(tmp_path).as_posix() for p in config.fragment_paths("linux-source-6.12", tmp_path)]
    assert names == ["00-base.config", "90-hotplug.config", "linux-source-6.12/90-hotplug.config",
                     "95-last.config"]
    assert config.requested_options(config.fragment_paths("linux-source-6.12", tmp_path)) == \
        {"CONFIG_A": "y", "CONFIG_OLD": "n", "CONFIG_NEW": "y", "CONFIG_B": "y"}
    assert config.fragment_paths("linux-source-6.1", tmp_path) == config.fragment_paths(None, tmp_path)


def test_memory_hotplug_onlines_new_memory_in_either_kernel_spelling():
    """Debian 12's 6.1 and Debian 13's 6.12 (which has upstream 6.14's MHP_DEFAULT_ONLINE_TYPE
    choice) spell "online hot-added memory at once" differently; each gets its own."""
    old = config.requested_options(config.fragment_paths("linux-source-6.1"))
    new = config.requested_options(config.fragment_paths("linux-source-6.12"))
    assert old["CONFIG_MEMORY_HOTPLUG_DEFAULT_ONLINE"] == "y" and "CONFIG_MHP_DEFAULT_ONLINE_TYPE_ONLINE_AUTO" not in old
    assert new["CONFIG_MHP_DEFAULT_ONLINE_TYPE_ONLINE_AUTO"] == "y" and "CONFIG_MEMORY_HOTPLUG_DEFAULT_ONLINE" not in new
