#!/usr/bin/env bash
# What the pod spends per request: the FastAPI example with its middleware in Python
# (before/app.py) against app.py behind gatehouse (proxy.toml), measured in one run; what the
# proxy in front of the app costs, gatehouse against nginx in the same seat (--seat); and
# gzip-coded ~20 KiB JSON answers compressed by Starlette's GZipMiddleware against gatehouse's
# `compress` (--gzip).
#
#   bash deploy/examples/fastapi/bench.sh                                 # ~2.5 min; Markdown on stdout
#   bash deploy/examples/fastapi/bench.sh --rounds 1 --duration 3 --warmup 1   # ~30 s smoke run
#   bash deploy/examples/fastapi/bench.sh --targets after,after-unix      # the app over TCP vs a Unix socket
#   bash deploy/examples/fastapi/bench.sh --seat                          # ~6 min; the proxy's seat: nginx vs gatehouse
#   bash deploy/examples/fastapi/bench.sh --seat --syscalls perf          # ... with syscalls per request
#   bash deploy/examples/fastapi/bench.sh --gzip                          # ~2.5 min; gzip in Python vs in gatehouse
#   bash deploy/examples/fastapi/bench.sh --help                          # every option
#
# Sets up what it needs first: wrk, h2load, taskset and nginx (and strace for --syscalls
# strace) if missing (benches/compare/install.sh: apt-get, as root or through sudo; starts no
# service), the example's pinned requirements in a venv (under target/fastapi-bench-venv, one per `--python PATH`, default python3 on PATH), and
# `cargo build --release` of this checkout unless --binary names a gatehouse binary. The
# measuring is bench.py's. The apps' CPU time is most of the pod's, so the interpreter's build
# shows in the figures (pyenv, for one, builds without PGO/LTO by default); the output names it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../../.." && pwd)"

binary=""
python="python3"
args=()
tools=(wrk h2load taskset nginx)
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help)
            echo "bench.sh [--python PATH] [bench.py's options]: the venv's interpreter (default python3)"
            exec python3 "$here/bench.py" --help
            ;;
        --python) python="${2:?--python needs a path}"; shift 2 ;;
        --python=*) python="${1#--python=}"; shift ;;
        --binary) binary="${2:?--binary needs a path}"; args+=("$1" "$2"); shift 2 ;;
        --binary=*) binary="${1#--binary=}"; args+=("$1"); shift ;;
        --syscalls) tools+=("${2:?--syscalls needs perf or strace}"); args+=("$1" "$2"); shift 2 ;;
        --syscalls=*) tools+=("${1#--syscalls=}"); args+=("$1"); shift ;;
        *) args+=("$1"); shift ;;
    esac
done

# perf is not installed here: Debian's linux-perf must match the running kernel.
installable=()
for tool in "${tools[@]}"; do
    [ "$tool" = perf ] || installable+=("$tool")
done
bash "$root/benches/compare/install.sh" "${installable[@]}"

# One venv per interpreter, rebuilt when requirements.txt changes (its stamp holds the file).
if ! interpreter="$("$python" -c 'import os, sys; print(os.path.realpath(sys.executable), sys.version.split()[0])')"; then
    echo "bench: --python $python does not run" >&2
    exit 2
fi
venv="$root/target/fastapi-bench-venv/$(echo "$interpreter" | cksum | cut -d' ' -f1)"
if ! cmp -s "$here/requirements.txt" "$venv/installed-requirements.txt"; then
    echo "bench: installing requirements.txt into $venv ($interpreter)" >&2
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt" >&2
    cp "$here/requirements.txt" "$venv/installed-requirements.txt"
fi

if [ -z "$binary" ]; then
    echo "bench: cargo build --release" >&2
    (cd "$root" && cargo build --release --quiet) >&2
    binary="$root/target/release/gatehouse"
    args+=(--binary "$binary")
fi
if [ ! -x "$binary" ]; then
    echo "bench: --binary $binary is not an executable" >&2
    exit 2
fi
exec "$venv/bin/python" "$here/bench.py" --venv "$venv" "${args[@]}"
