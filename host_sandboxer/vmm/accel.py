"""Choose QEMU's accelerator: kvm only when it will really run a normal guest, else tcg.

A /dev/kvm that opens is not enough.  Nested and containerised hosts may expose KVM through a
paravirtual module such as kvm_pvm (this project's build machine), under which a normal guest
kernel hangs.  KVM is chosen only when all of these hold:
  1. the CPU advertises hardware virtualisation (`vmx` or `svm` in /proc/cpuinfo flags);
  2. a hardware vendor module is loaded (/sys/module/kvm_intel or kvm_amd) and no paravirtual
     one (/sys/module/kvm_pvm);
  3. /dev/kvm opens read-write and KVM_GET_API_VERSION answers 12 (the stable API).
"""
from __future__ import annotations

import fcntl
import os
import re
from dataclasses import dataclass
from pathlib import Path

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
HARDWARE_MODULES = ("kvm_intel", "kvm_amd")
PARAVIRTUAL_MODULES = ("kvm_pvm",)


@dataclass(frozen=True)
class HostFacts:
    """What the decision reads from the host, gathered in one place so tests can supply it."""

    cpu_flags: frozenset[str]
    kvm_modules: frozenset[str]
    kvm_api_version: int | None  # None: /dev/kvm missing or not openable
    kvm_error: str = ""
    # The host TSC rate, which is also the guest's under TCG (rdtsc reads the host's counter).
    tsc_khz: int | None = None

    @classmethod
    def probe(cls, root: Path = Path("/")) -> "HostFacts":
        version, error = _kvm_api_version(root / "dev" / "kvm")
        modules = frozenset(m for m in HARDWARE_MODULES + PARAVIRTUAL_MODULES
                            if (root / "sys" / "module" / m).exists())
        flags, tsc_khz = _cpuinfo(root / "proc" / "cpuinfo")
        return cls(flags, modules, version, error, tsc_khz)


@dataclass(frozen=True)
class AccelChoice:
    accel: str  # "kvm" or "tcg"
    reason: str


def choose_accel(facts: HostFacts) -> AccelChoice:
    """Apply the rules of the module docstring to `facts`."""
    if facts.kvm_api_version is None:
        return AccelChoice("tcg", f"/dev/kvm unusable: {facts.kvm_error or 'absent'}")
    if facts.kvm_api_version != KVM_API_VERSION:
        return AccelChoice("tcg", f"KVM_GET_API_VERSION is {facts.kvm_api_version}, not {KVM_API_VERSION}")
    paravirtual = sorted(facts.kvm_modules & set(PARAVIRTUAL_MODULES))
    if paravirtual:
        return AccelChoice("tcg", f"/dev/kvm is served by paravirtual module {paravirtual[0]}")
    if not facts.cpu_flags & {"vmx", "svm"}:
        return AccelChoice("tcg", "CPU has no vmx/svm flag (no hardware virtualisation)")
    if not facts.kvm_modules & set(HARDWARE_MODULES):
        return AccelChoice("tcg", "neither kvm_intel nor kvm_amd is loaded")
    return AccelChoice("kvm", "hardware KVM usable")


def resolve_accel(configured: str, facts: HostFacts | None = None) -> AccelChoice:
    """The configured accel ("kvm"/"tcg" taken as given), or the auto-detected one."""
    if configured != "auto":
        return AccelChoice(configured, "set in configuration")
    return choose_accel(facts if facts is not None else HostFacts.probe())


def _cpuinfo(cpuinfo: Path) -> tuple[frozenset[str], int | None]:
    """The first CPU's flags, and its TSC rate in kHz: the nominal rate in an Intel model name
    ("... @ 2.60GHz"), else "cpu MHz" (exact in a VM, the current clock on a bare-metal host)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset(), None
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        name, _, value = line.partition(":")
        fields[name.strip()] = value.strip()
    nominal = re.search(r"@ (\d+(?:\.\d+)?)GHz", fields.get("model name", ""))
    try:
        tsc_khz = round(float(nominal.group(1)) * 1e6) if nominal else round(float(fields["cpu MHz"]) * 1e3)
    except (KeyError, ValueError):
        tsc_khz = None
    return frozenset(fields.get("flags", "").split()), tsc_khz


def _kvm_api_version(dev: Path) -> tuple[int | None, str]:
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return None, f"{dev}: {e.strerror}"
    try:
        return fcntl.ioctl(fd, KVM_GET_API_VERSION), ""
    except OSError as e:
        return None, f"KVM_GET_API_VERSION: {e.strerror}"
    finally:
        os.close(fd)
