#!/usr/bin/env bash
# gatehouse against nginx and haproxy, side by side. See README.md in this folder.
#
#   bash benches/compare/run.sh                                      # ~3 min; Markdown on stdout
#   bash benches/compare/run.sh --rate 2000                          # at a fixed offered rate
#   bash benches/compare/run.sh --duration 2 --warmup 1 --rounds 1   # ~30 s smoke run
#   bash benches/compare/run.sh --help                               # every option
#
# Sets up what it needs first: nginx, haproxy, wrk, h2load and taskset if missing (install.sh:
# apt-get, as root or through sudo; starts no service), and `cargo build --release` of this
# checkout unless --binary names a gatehouse binary. The measuring is bench.py's.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

binary=""
args=()
tools=(nginx haproxy wrk h2load taskset python3)
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) exec python3 "$here/bench.py" --help ;;
        --binary) binary="${2:?--binary needs a path}"; args+=("$1" "$2"); shift 2 ;;
        --binary=*) binary="${1#--binary=}"; args+=("$1"); shift ;;
        --syscalls) [ "${2:-}" != strace ] || tools+=(strace); args+=("$1"); shift ;;
        --syscalls=strace) tools+=(strace); args+=("$1"); shift ;;
        *) args+=("$1"); shift ;;
    esac
done

bash "$here/install.sh" "${tools[@]}"
if [ -z "$binary" ]; then
    echo "bench: cargo build --release" >&2
    (cd "$root" && cargo build --release --quiet) >&2
    args+=(--binary "$root/target/release/gatehouse")
fi
exec python3 "$here/bench.py" "${args[@]}"
