#!/usr/bin/env bash
# Installs the commands the benchmarks need from Debian's packages, only those missing:
#   bash benches/compare/install.sh                     # what run.sh needs
#   bash benches/compare/install.sh wrk h2load nginx    # just these (deploy/examples/fastapi/bench.sh)
# Needs root or sudo. Starts no service: package scripts are kept from starting the daemons
# they install (policy-rc.d), and the distribution's units are disabled.
set -euo pipefail

declare -A package=([nginx]=nginx [haproxy]=haproxy [wrk]=wrk [h2load]=nghttp2-client
                    [taskset]=util-linux [python3]=python3 [strace]=strace)
wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=(nginx haproxy wrk h2load taskset python3)

missing=()
for cmd in "${wanted[@]}"; do
    if [ -z "${package[$cmd]:-}" ]; then
        echo "install.sh: no package known for \`$cmd\` (known: ${!package[*]})" >&2
        exit 2
    fi
    PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 || missing+=("${package[$cmd]}")
done
[ ${#missing[@]} -gt 0 ] || exit 0

if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif sudo -n true 2>/dev/null; then
    sudo=(sudo)
else
    echo "install.sh: missing ${missing[*]}: run \`sudo apt-get install ${missing[*]}\` (Debian/Ubuntu)" >&2
    exit 2
fi
echo "install.sh: apt-get install ${missing[*]}" >&2
created_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
    # exit 101, "action not allowed": the packages' scripts do not start their daemons
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee /usr/sbin/policy-rc.d >/dev/null
    "${sudo[@]}" chmod 755 /usr/sbin/policy-rc.d
    created_policy=1
fi
trap '[ -z "$created_policy" ] || "${sudo[@]}" rm -f /usr/sbin/policy-rc.d' EXIT
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
if command -v systemctl >/dev/null 2>&1; then
    "${sudo[@]}" systemctl disable --now nginx.service haproxy.service >/dev/null 2>&1 || true
fi
for cmd in "${wanted[@]}"; do
    PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 || { echo "install.sh: $cmd still missing" >&2; exit 1; }
done
