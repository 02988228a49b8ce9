#!/usr/bin/env bash
# Installs the Debian packages Gatehouse needs that a fresh Debian machine with Swift lacks.
# Usage: scripts/install-deps.sh [run|test|bench]   (what you are about to do; default: run)
set -euo pipefail

purpose=${1:-run}
packages=(zlib1g-dev libcurl4 gcc make)
case "$purpose" in
    run) ;;
    test) packages+=(prometheus openssl) ;;  # promtool validates /metrics; openssl makes test certificates
    bench) packages+=(nginx-light wrk) ;;
    *) echo "usage: $0 [run|test|bench]" >&2; exit 2 ;;
esac
# Debian's python3 needs python3-venv for the test clients' virtualenv.
if [[ "$purpose" == test ]] && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    packages+=(python3-venv)
fi

missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
((${#missing[@]})) || exit 0

sudo=()
if [[ $(id -u) -ne 0 ]]; then sudo=(sudo); fi
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
