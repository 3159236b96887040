#!/usr/bin/env bash
# `make debian13-check` (by hand, not in CI): do `make setup` and `make guest-image` work on
# Debian 13, and does what they make boot? A minimal trixie root is made with debootstrap in a
# temporary directory (from the Debian mirror this machine's apt uses, checked with its archive
# keyring), a copy of the work tree's tracked files is put in it, and `make setup` runs there in
# a chroot; then what depends on the release is printed (the kernel source and virtiofsd found,
# the guest runtime made runnable), `make guest-image` builds the guest from trixie's kernel
# source, Python and packages, and `bench.boot --runs 1` boots it with trixie's QEMU and
# virtiofsd in each mode (initrd, pmem root, a template's clone) beside both floors.
# Needs root; installs debootstrap on this host if missing. The root is removed at the end
# (KEEP=1 keeps it). ~10 minutes, most of it the kernel's first build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "debian13-check: needs root (debootstrap, chroot)" >&2; exit 1; }
if ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi
mirror=$(.venv/bin/python -c 'from initrd.debian import host_mirror; print(host_mirror())')
root=$(mktemp -d /var/tmp/debian13-check.XXXXXX)

cleanup() {
    for m in dev/shm dev/pts dev proc sys; do umount -l "$root/$m" 2>/dev/null || true; done
    if [ "${KEEP:-0}" = 1 ]; then echo "debian13-check: root kept in $root"; else rm -rf "$root"; fi
}
trap cleanup EXIT

echo "debian13-check: debootstrap trixie into $root"
debootstrap --variant=minbase --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
    trixie "$root" "$mirror" >"$root.debootstrap.log" 2>&1 \
    || { tail -20 "$root.debootstrap.log"; exit 1; }
rm -f "$root.debootstrap.log"
mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
mount --bind /dev/shm "$root/dev/shm"  # guest RAM files (memfd fallbacks, templates)
# The chroot reaches the network the way this machine does: its resolver, and the local CA
# certificates it trusts (a machine behind a TLS-inspecting proxy), which ca-certificates adds
# to the chroot's bundle when `make setup` installs it.
cp /etc/resolv.conf "$root/etc/resolv.conf"
mkdir -p "$root/usr/local/share/ca-certificates"
cp -r /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
mkdir "$root/src"
git ls-files -z | xargs -0 tar -cf - | tar -xf - -C "$root/src"

chroot "$root" /bin/bash -euo pipefail -c '
    cd /src
    . /etc/os-release; echo "debian13-check: inside $PRETTY_NAME"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends make >/dev/null
    time make setup
    .venv/bin/python -c "
from host_sandboxer.config import Config
from kernel.build import kernel_source, source_version
source = kernel_source()
print(\"debian13-check: kernel source\", source.tarball, source_version(source))
print(\"debian13-check: virtiofsd\", Config().sharefs.virtiofsd)"
    "$(.venv/bin/python -c "from host_sandboxer.config import Config; print(Config().sharefs.virtiofsd)")" --version
    qemu-system-x86_64 --version | head -1
    crun=$(.venv/bin/python -m initrd.guest_runtime crun)
    echo "debian13-check: guest runtime $crun"
    "$crun" --version | head -1
'
chroot "$root" /bin/bash -euo pipefail -c 'cd /src && make guest-image'

# virtiofsd's sandbox pivots its root, which fails inside a chroot ("Error entering sandbox:
# CleanMount ... Invalid argument"): the boots run with the trixie root made the real root of a
# mount namespace of their own.
unshare --mount --fork /bin/bash -euo pipefail -c '
    mount --make-rprivate /
    mount --rbind "$1" "$1"
    mkdir -p "$1/.oldroot"
    cd "$1"
    pivot_root . .oldroot
    umount -l /.oldroot
    cd /src
    .venv/bin/python -m bench.boot --runs 1 >/tmp/debian13-boot.json
    .venv/bin/python -c "
import json
r = json.load(open(\"/tmp/debian13-boot.json\"))
for name, mode in r[\"modes\"].items():
    print(f\"debian13-check: booted {name}: ready in {mode[\"median_s\"]} s, {r[\"ratio_median\"][name]}x the floor\")
print(f\"debian13-check: floor {r[\"floor\"][\"median_s\"]} s, Python floor {r[\"python_floor\"][\"median_s\"]} s\")"
' _ "$root"
echo "debian13-check: ok"
