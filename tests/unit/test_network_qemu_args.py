"""The launcher's NIC hook: TapNic -> -netdev tap,fd(s)= / virtio-net with the pod link's MAC."""
from pathlib import Path

from host_sandboxer.vmm.cmdline import TapNic, VmSpec, build_argv, pass_fds


def spec(**kw) -> VmSpec:
    return VmSpec(kernel=Path("/k"), initrd=Path("/i"), console_socket=Path("/c.sock"),
                  qmp_socket=Path("/q.sock"), **kw)


def option(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_single_queue_tap():
    argv = build_argv(spec(nics=(TapNic("tap0_vmm", "02:00:00:00:00:01", (9,)),)))
    assert option(argv, "-netdev") == ["tap,id=tap0_vmm,fd=9"]
    assert "virtio-net-pci,netdev=tap0_vmm,mac=02:00:00:00:00:01,romfile=" in option(argv, "-device")


def test_multiqueue_taps_on_q35_get_msix_vectors():
    nics = (TapNic("tap0_vmm", "02:00:00:00:00:01", (9, 10)),
            TapNic("tap1_vmm", "02:00:00:00:00:02", (11, 12)))
    s = spec(nics=nics, cpus=2)
    argv = build_argv(s)
    assert option(argv, "-netdev") == ["tap,id=tap0_vmm,fds=9:10", "tap,id=tap1_vmm,fds=11:12"]
    assert "virtio-net-pci,netdev=tap1_vmm,mac=02:00:00:00:00:02,mq=on,vectors=6,romfile=" in option(argv, "-device")
    assert pass_fds(s) == [9, 10, 11, 12]


def test_microvm_uses_virtio_mmio_without_pci_vectors():
    argv = build_argv(spec(machine="microvm", nics=(TapNic("tap0_vmm", "02:00:00:00:00:01", (9, 10)),)))
    assert "virtio-net-device,netdev=tap0_vmm,mac=02:00:00:00:00:01,mq=on" in option(argv, "-device")


def test_no_nics_no_network_and_no_fds():
    s = spec()
    assert "-netdev" not in build_argv(s) and pass_fds(s) == []
