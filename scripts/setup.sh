#!/usr/bin/env bash
# `make setup`: install every Debian package and Python dependency the project needs.
# Idempotent: apt runs only when a package is missing; pip only when pyproject.toml changed.
# The package list is scripts/apt-packages.txt plus the one of this Debian release
# (scripts/apt-packages-<VERSION_CODENAME>.txt: bookworm = Debian 12, trixie = Debian 13).
set -euo pipefail
cd "$(dirname "$0")/.."
PY_HOST=${PY_HOST:-/usr/bin/python3}

codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
release_list=scripts/apt-packages-$codename.txt
if [ -z "$codename" ] || [ ! -f "$release_list" ]; then
    known=$(cd scripts && ls apt-packages-*.txt | sed -e 's/apt-packages-//' -e 's/\.txt//' | paste -sd, -)
    echo "setup: Debian release '${codename:-unknown}' (/etc/os-release VERSION_CODENAME) has no" \
         "package list $release_list; known: $known" >&2
    exit 1
fi
mapfile -t pkgs < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' scripts/apt-packages.txt "$release_list")
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

stamp=.venv/.setup-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
    [ -x .venv/bin/python ] || "$PY_HOST" -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[dev]'
    rm -f .venv/.setup-*
    touch "$stamp"
fi
echo "setup: ok"
