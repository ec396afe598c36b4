#!/usr/bin/env bash
# What the pod spends per request: the FastAPI example with its middleware in Python
# (before/app.py) against app.py behind gatehouse (proxy.toml), measured in one run.
#
#   bash deploy/examples/fastapi/bench.sh                                 # ~2.5 min; Markdown on stdout
#   bash deploy/examples/fastapi/bench.sh --rounds 1 --duration 3 --warmup 1   # ~30 s smoke run
#   bash deploy/examples/fastapi/bench.sh --targets after,after-unix      # the app over TCP vs a Unix socket
#   bash deploy/examples/fastapi/bench.sh --help                          # every option
#
# Sets up what it needs first: wrk, h2load (Debian's nghttp2-client) and taskset if missing
# (apt-get, as root or through sudo), the example's pinned requirements in a venv (under
# target/fastapi-bench-venv, one per `--python PATH`, default python3 on PATH), and
# `cargo build --release` of this checkout unless --binary names a gatehouse binary. The
# measuring is bench.py's. The apps' CPU time is most of the pod's, so the interpreter's build
# shows in the figures (pyenv, for one, builds without PGO/LTO by default); the output names it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../../.." && pwd)"

binary=""
python="python3"
args=()
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
        *) args+=("$1"); shift ;;
    esac
done

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        sudo=()
    elif sudo -n true 2>/dev/null; then
        sudo=(sudo)
    else
        echo "bench: missing ${missing[*]}: run \`sudo apt-get install ${missing[*]}\` (Debian/Ubuntu)" >&2
        exit 2
    fi
    echo "bench: apt-get install ${missing[*]}" >&2
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >&2
fi

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
