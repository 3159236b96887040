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
