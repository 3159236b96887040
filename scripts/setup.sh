#!/usr/bin/env bash
# `make setup`: install every Debian package and Python dependency the project needs.
# Idempotent: apt runs only when a package is missing; pip only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_HOST=${PY_HOST:-/usr/bin/python3}

mapfile -t pkgs < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' scripts/apt-packages.txt)
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
