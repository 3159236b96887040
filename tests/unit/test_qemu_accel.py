"""Accelerator auto-detection.

The decision is tested on HostFacts values written here: this machine has only the paravirtual
kvm_pvm /dev/kvm, so real hardware KVM (and a missing /dev/kvm) can only be supplied as facts.
The probe itself is exercised against this machine and against a fake /proc + /sys tree.
"""
from pathlib import Path

from host_sandboxer.vmm.accel import HostFacts, choose_accel, resolve_accel

HARDWARE = HostFacts(cpu_flags=frozenset({"fpu", "vmx"}), kvm_modules=frozenset({"kvm_intel"}),
                     kvm_api_version=12)


def with_(**kw) -> HostFacts:
    return HostFacts(**{**HARDWARE.__dict__, **kw})


def test_hardware_kvm_is_chosen():
    assert choose_accel(HARDWARE).accel == "kvm"
    assert choose_accel(with_(cpu_flags=frozenset({"svm"}), kvm_modules=frozenset({"kvm_amd"}))).accel == "kvm"


def test_paravirtual_kvm_is_refused_even_with_vmx():
    choice = choose_accel(with_(kvm_modules=frozenset({"kvm_intel", "kvm_pvm"})))
    assert choice.accel == "tcg" and "kvm_pvm" in choice.reason


def test_tcg_when_kvm_missing_or_odd():
    assert choose_accel(with_(kvm_api_version=None, kvm_error="/dev/kvm: No such file")).reason.endswith("No such file")
    assert choose_accel(with_(kvm_api_version=11)).accel == "tcg"
    assert "vmx/svm" in choose_accel(with_(cpu_flags=frozenset({"fpu", "hypervisor"}))).reason
    assert "kvm_intel nor kvm_amd" in choose_accel(with_(kvm_modules=frozenset())).reason


def test_configured_accel_wins():
    pvm = with_(kvm_modules=frozenset({"kvm_pvm"}))
    assert resolve_accel("kvm", pvm).accel == "kvm"
    assert resolve_accel("tcg", HARDWARE).accel == "tcg"
    assert resolve_accel("auto", pvm).accel == "tcg"


def test_probe_reads_fake_tree(tmp_path: Path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu vmx sse\n\n")
    (tmp_path / "sys" / "module" / "kvm_intel").mkdir(parents=True)
    facts = HostFacts.probe(tmp_path)
    assert facts.cpu_flags == {"fpu", "vmx", "sse"}
    assert facts.kvm_modules == {"kvm_intel"}
    assert facts.kvm_api_version is None and "dev/kvm" in facts.kvm_error  # no device node in the fake tree
    assert choose_accel(facts).accel == "tcg"


def test_tsc_rate_from_cpuinfo(tmp_path: Path):
    (tmp_path / "proc").mkdir()
    cpuinfo = tmp_path / "proc" / "cpuinfo"
    cpuinfo.write_text("model name\t: Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz\ncpu MHz\t\t: 1200.000\n\n"
                       "model name\t: other\n")
    assert HostFacts.probe(tmp_path).tsc_khz == 2_400_000  # nominal, not the throttled clock
    cpuinfo.write_text("model name\t: AMD EPYC\ncpu MHz\t\t: 2596.144\nflags\t: fpu\n")
    assert HostFacts.probe(tmp_path).tsc_khz == 2_596_144
    cpuinfo.write_text("model name\t: AMD EPYC\n")
    assert HostFacts.probe(tmp_path).tsc_khz is None


def test_this_machine_probe_is_consistent():
    facts = HostFacts.probe()
    choice = choose_accel(facts)
    if "kvm_pvm" in facts.kvm_modules:  # the build machine: its /dev/kvm hangs normal guests
        assert choice.accel == "tcg"
    if choice.accel == "kvm":
        assert facts.kvm_api_version == 12 and facts.cpu_flags & {"vmx", "svm"}
