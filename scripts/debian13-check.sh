#!/usr/bin/env bash
# `make debian13-check` (by hand, not in CI): does `make setup` work on Debian 13? A minimal
# trixie root is made with debootstrap in a temporary directory (from the Debian mirror this
# machine's apt uses, checked with its archive keyring), a copy of the work tree's tracked
# files is put in it, and `make setup` runs there in a chroot; then what depends on the release
# is printed: the kernel source and virtiofsd found, and the guest runtime made runnable.
# Needs root; installs debootstrap on this host if missing. The root is removed at the end
# (KEEP=1 keeps it).
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
    for m in dev/pts dev proc sys; do umount -l "$root/$m" 2>/dev/null || true; done
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
echo "debian13-check: ok"
