"""The QEMU command-line builder: q35/microvm, kvm/tcg, hybrid/kernel vsock, virtiofs/9p."""
from pathlib import Path

import pytest

from host_sandboxer.vmm.cmdline import (NinePShare, PmemRoot, TapNic, VirtiofsShare, VmSpec, build_argv,
                                        pass_fds)

# What the vsock transports' qemu_args() return (host_sandboxer/vsock): virtio-pci names.
HYBRID_ARGS = ("-chardev", "socket,id=vsock0,path=/run/vm/vhost-vsock.sock",
               "-device", "vhost-user-vsock-pci,chardev=vsock0")
KERNEL_ARGS = ("-device", "vhost-vsock-pci,id=vsock0,guest-cid=7")


def spec(**kw) -> VmSpec:
    base = dict(kernel=Path("/img/kernel"), initrd=Path("/img/initrd.img"),
                console_socket=Path("/run/vm/console.sock"), qmp_socket=Path("/run/vm/qmp.sock"))
    return VmSpec(**{**base, **kw})


def option(argv: list[str], flag: str) -> list[str]:
    """Every value given to `flag` in argv."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_q35_tcg_defaults():
    argv = build_argv(spec())
    assert argv[0] == "qemu-system-x86_64"
    assert option(argv, "-machine") == ["q35,accel=tcg,memory-backend=mem,sata=off"]
    assert option(argv, "-object")[0] == "memory-backend-memfd,id=mem,size=512M,share=on"
    assert option(argv, "-m") == ["512M"]
    for flag in ("-nodefaults", "-no-user-config", "-nographic", "-no-reboot"):
        assert flag in argv
    assert "-cpu" not in argv  # TCG: QEMU's default model, `host` needs KVM
    assert "-netdev" not in argv and "-nic" not in argv
    assert option(argv, "-kernel") == ["/img/kernel"]
    assert option(argv, "-initrd") == ["/img/initrd.img"]
    assert option(argv, "-append") == ["console=ttyS0 panic=-1 dhash_entries=8192 ihash_entries=4096 thash_entries=1024"]
    assert "socket,id=console,path=/run/vm/console.sock,server=on,wait=off" in option(argv, "-chardev")
    assert option(argv, "-serial") == ["chardev:console"]
    assert "socket,id=qmp,path=/run/vm/qmp.sock,server=on,wait=off" in option(argv, "-chardev")
    assert option(argv, "-mon") == ["chardev=qmp,mode=control"]
    assert "-S" in argv  # the daemon lets the guest run once it reads the console
    assert "rng-random,id=rng,filename=/dev/urandom" in option(argv, "-object")
    assert option(argv, "-device") == ["virtio-rng-pci,rng=rng"]


def test_kvm_uses_host_cpu():
    argv = build_argv(spec(accel="kvm", cpus=2, memory_mib=256))
    assert option(argv, "-cpu") == ["host"]
    assert option(argv, "-machine") == ["q35,accel=kvm,memory-backend=mem,sata=off"]
    assert option(argv, "-smp") == ["2"]
    assert option(argv, "-object")[0] == "memory-backend-memfd,id=mem,size=256M,share=on"


def test_template_ram_in_a_shared_file_and_a_clone_waits_for_its_state():
    """A template's RAM must outlive QEMU (a file, shared so vhost-user backends see it); a clone
    starts waiting for the saved machine state (QMP migrate-incoming)."""
    argv = build_argv(spec(ram_file=Path("/dev/shm/t,1.ram")))
    assert option(argv, "-object")[0] == "memory-backend-file,id=mem,size=512M,mem-path=/dev/shm/t,,1.ram,share=on"
    assert "-incoming" not in argv
    assert option(build_argv(spec(ram_file=Path("/dev/shm/c.ram"), incoming=True)), "-incoming") == ["defer"]


def test_vcpu_headroom_for_hotplug():
    assert option(build_argv(spec(cpus=1, max_cpus=4)), "-smp") == ["1,maxcpus=4"]
    assert option(build_argv(spec(cpus=4, max_cpus=2)), "-smp") == ["4"]  # a pod's resources raised cpus


def test_microvm_uses_mmio_devices():
    argv = build_argv(spec(machine="microvm", vsock_args=HYBRID_ARGS, share=VirtiofsShare(Path("/run/vm/fs.sock"))))
    assert option(argv, "-machine") == ["microvm,accel=tcg,memory-backend=mem"]
    assert option(argv, "-device") == ["virtio-rng-device,rng=rng", "vhost-user-vsock-device,chardev=vsock0",
                                       "vhost-user-fs-device,chardev=fs,tag=kuasar"]
    assert option(build_argv(spec(machine="microvm", share=NinePShare(Path("/srv")))), "-device") == \
        ["virtio-rng-device,rng=rng", "virtio-9p-device,fsdev=fs,mount_tag=kuasar"]


def test_microvm_under_tcg_is_told_the_tsc_rate():
    assert "tsc_early_khz=2596144" in option(build_argv(spec(machine="microvm", tsc_khz=2596144)), "-append")[0]
    for other in (spec(machine="q35", tsc_khz=2596144), spec(machine="microvm", accel="kvm", tsc_khz=2596144),
                  spec(machine="microvm")):
        assert "tsc_early_khz" not in option(build_argv(other), "-append")[0]


def test_hybrid_vsock_and_virtiofs_on_q35():
    argv = build_argv(spec(vsock_args=HYBRID_ARGS, share=VirtiofsShare(Path("/run/vm/fs.sock")),
                           kernel_params=("task.debug",)))
    chardevs = option(argv, "-chardev")
    assert "socket,id=vsock0,path=/run/vm/vhost-vsock.sock" in chardevs
    assert "socket,id=fs,path=/run/vm/fs.sock" in chardevs
    assert option(argv, "-device")[1:] == ["vhost-user-vsock-pci,chardev=vsock0",
                                       "vhost-user-fs-pci,chardev=fs,tag=kuasar"]
    assert option(argv, "-append") == ["console=ttyS0 panic=-1 dhash_entries=8192 ihash_entries=4096 thash_entries=1024 "
                                       "task.sharefs_type=virtiofs task.debug"]


def test_kernel_vsock_and_9p():
    argv = build_argv(spec(vsock_args=KERNEL_ARGS, share=NinePShare(Path("/srv/state"))))
    assert option(argv, "-device")[1:] == ["vhost-vsock-pci,id=vsock0,guest-cid=7", "virtio-9p-pci,fsdev=fs,mount_tag=kuasar"]
    assert option(argv, "-fsdev") == ["local,id=fs,path=/srv/state,security_model=none"]
    assert "task.sharefs_type=9p" in option(argv, "-append")[0].split()


@pytest.mark.parametrize("path", ["/run/a,b/fs.sock"])
def test_commas_in_paths_are_escaped(path):
    argv = build_argv(spec(share=NinePShare(Path(path)), console_socket=Path("/x,y.sock")))
    assert option(argv, "-fsdev") == ["local,id=fs,path=/run/a,,b/fs.sock,security_model=none"]
    assert "socket,id=console,path=/x,,y.sock,server=on,wait=off" in option(argv, "-chardev")


def test_seccomp_filter_when_asked():
    assert "-sandbox" not in build_argv(spec())
    assert option(build_argv(spec(seccomp=True)), "-sandbox") == [
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]


def test_sockets_made_for_qemu_are_named_by_fd_and_inherited():
    """QEMU as a user of its own opens no socket of the pod's directory (vmm/qemu_fds.py)."""
    s = spec(console_fd=10, qmp_fd=11, inherited_fds=(10, 11, 12, 13),
             vsock_args=("-chardev", "socket,id=vsock0,fd=12", "-device", "vhost-user-vsock-pci,chardev=vsock0"),
             share=VirtiofsShare(Path("/run/vm/virtiofsd.sock"), fd=13),
             nics=(TapNic("net0", "02:00:00:00:00:01", (20,)),))
    argv = build_argv(s)
    assert option(argv, "-chardev") == ["socket,id=console,fd=10,server=on,wait=off",
                                        "socket,id=qmp,fd=11,server=on,wait=off",
                                        "socket,id=vsock0,fd=12", "socket,id=fs,fd=13"]
    assert not any("/run/vm" in arg for arg in argv)
    assert pass_fds(s) == [20, 10, 11, 12, 13]


def test_pmem_root_replaces_the_initrd_with_a_read_only_dax_image():
    argv = build_argv(spec(initrd=None, root=PmemRoot(Path("/img/root,fs.img"), 40 << 20)))
    assert "-initrd" not in argv
    assert option(argv, "-m") == ["512M,slots=1,maxmem=552M"]
    assert ("memory-backend-file,id=rootfs,mem-path=/img/root,,fs.img,size=41943040,share=on,"
            "readonly=on") in option(argv, "-object")
    assert "virtio-pmem-pci,memdev=rootfs,id=rootfs" in option(argv, "-device")
    params = option(argv, "-append")[0].split()
    for param in ("root=/dev/pmem0", "rootfstype=erofs", "rootflags=dax=always", "ro", "init=/init"):
        assert param in params


@pytest.mark.parametrize("changes, why", [
    (dict(initrd=None), "exactly one"),
    (dict(root=PmemRoot(Path("/img/rootfs.img"), 2 << 20)), "exactly one"),
    (dict(initrd=None, root=PmemRoot(Path("/img/rootfs.img"), 2 << 20), machine="microvm"), "q35"),
])
def test_a_vm_boots_from_exactly_one_image_and_pmem_needs_q35(changes, why):
    with pytest.raises(ValueError, match=why):
        build_argv(spec(**changes))


def test_free_page_reporting_adds_a_balloon():
    assert "virtio-balloon-pci,id=balloon,free-page-reporting=on" in option(
        build_argv(spec(free_page_reporting=True)), "-device")
    assert not any("balloon" in d for d in option(build_argv(spec()), "-device"))


def test_a_template_has_spare_root_ports_and_vmgenid_and_only_on_q35():
    """A clone hot-plugs its pod's vsock, share and NICs into the template's spare root ports;
    vmgenid makes its kernel reseed its CRNG on the restore."""
    devices = option(build_argv(spec(clonable=True)), "-device")
    assert [d for d in devices if d.startswith("pcie-root-port")] == [
        "pcie-root-port,id=hp-vsock,chassis=1,slot=1", "pcie-root-port,id=hp-fs,chassis=2,slot=2",
        *(f"pcie-root-port,id=hp-net{i},chassis={i + 3},slot={i + 3}" for i in range(4))]
    assert "vmgenid,guid=auto" in devices
    assert not any("pcie-root-port" in d or "vmgenid" in d for d in option(build_argv(spec()), "-device"))
    with pytest.raises(ValueError, match="a template needs machine q35"):
        build_argv(spec(clonable=True, machine="microvm"))
