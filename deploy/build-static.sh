#!/usr/bin/env bash
# Build gatehouse as one static x86_64 musl binary, the container image's binary, without a
# container engine (CI runs this; so can a developer). deploy/build-image.sh then puts it in
# the image archive.
#
#   bash deploy/build-static.sh            # -> target/x86_64-unknown-linux-musl/release/gatehouse
#   bash deploy/build-static.sh --no-pgo   # one plain release build (~6 min on 2 cores, not ~14)
#
# By default the build is profile-guided: an instrumented build is trained on proxied
# traffic (benches/compare's scenarios, gatehouse alone: basic, full, policy, gzip6, wasm,
# closed loop and at 2,000 req/s), and the release build is laid out by that profile: 10-16%
# fewer instructions and 29-71% fewer instruction-cache misses per request, which is what a
# request pays for beside an app that keeps evicting the caches (docs/performance.md). Code
# the training does not run (other middleware types) is laid out as cold.
#
# Installs what is missing: the rustup target, musl-gcc (Debian's musl-tools), which
# mimalloc's C code needs, rustup's llvm-tools (llvm-profdata) and what the training runs
# (benches/compare/install.sh: nginx, wrk, h2load). Then checks that the result is
# statically linked and runs.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
    "") pgo=1 ;;
    --no-pgo) pgo=0 ;;
    *)
        echo "build-static: unknown argument '$1' (usage: build-static.sh [--no-pgo])" >&2
        exit 2
        ;;
esac

TARGET=x86_64-unknown-linux-musl
BIN="target/$TARGET/release/gatehouse"

if ! grep -qx "$TARGET" <<<"$(rustup target list --installed)"; then
    echo "build-static: adding rust target $TARGET"
    rustup target add "$TARGET"
fi
if ! command -v musl-gcc >/dev/null 2>&1; then
    echo "build-static: installing musl-tools (musl-gcc for mimalloc's C code)"
    if [ "$(id -u)" -ne 0 ]; then
        echo "build-static: musl-gcc is missing; install Debian's musl-tools (needs root)" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq musl-tools
fi
if ! command -v file >/dev/null 2>&1; then
    echo "build-static: 'file' is needed to check the binary (Debian's package: file)" >&2
    exit 1
fi

# cc-rs picks CC_<target> for the C parts; the Rust side links with musl's self-contained
# crt and libc, so the binary has no interpreter and no shared libraries.
export CC_x86_64_unknown_linux_musl=musl-gcc
if [ "$pgo" = 0 ]; then
    cargo build --release --locked --target "$TARGET"
else
    host="$(rustc -vV | sed -n 's/^host: //p')"
    profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
    if [ ! -x "$profdata" ]; then
        echo "build-static: adding rustup's llvm-tools (llvm-profdata merges the training profile)"
        rustup component add llvm-tools
    fi
    # The training's wasm scenario builds its plugin for this target.
    if ! grep -qx wasm32-wasip1 <<<"$(rustup target list --installed)"; then
        echo "build-static: adding rust target wasm32-wasip1 (the training's wasm plugin)"
        rustup target add wasm32-wasip1
    fi
    work="$PWD/target/pgo"
    rm -rf "$work/profiles"
    mkdir -p "$work/profiles"
    echo "build-static: 1/3 instrumented build (target/pgo/build)"
    RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$work/profiles" \
        cargo build --release --locked --target "$TARGET" --target-dir "$work/build"
    echo "build-static: 2/3 training (benches/compare, gatehouse alone; tables in target/pgo/*.md)"
    train=(bash benches/compare/run.sh --binary "$work/build/$TARGET/release/gatehouse"
        --targets gatehouse --scenarios basic,full,policy,gzip6,wasm --rounds 1 --duration 2
        --warmup 1 --retries 0)
    "${train[@]}" >"$work/closed-loop.md"
    "${train[@]}" --rate 2000 >"$work/rate-2000.md"
    "$profdata" merge -o "$work/gatehouse.profdata" "$work"/profiles/*.profraw
    # A training that never reached the HTTP/1 request path would lay the whole proxy out as
    # cold code: refuse such a profile (the function is protocol::h1::downstream::serve).
    # No `grep -q`: under pipefail, a reader that stops early can fail the writer (SIGPIPE).
    if ! "$profdata" show --all-functions --counts "$work/gatehouse.profdata" |
        grep -A4 '8protocol2h110downstream5serve' | grep 'Block counts: .*[1-9]' >/dev/null; then
        echo "build-static: the training profile has no counts for the HTTP/1 request path" \
            "(protocol::h1::downstream::serve); see target/pgo/*.md" >&2
        exit 1
    fi
    # The profile's digest in its name: cargo tracks RUSTFLAGS, not the file's content, so
    # a new profile rebuilds every crate instead of mixing two trainings.
    digest="$(sha256sum "$work/gatehouse.profdata" | cut -c1-16)"
    profile="$work/gatehouse-$digest.profdata"
    rm -f "$work"/gatehouse-*.profdata
    mv "$work/gatehouse.profdata" "$profile"
    echo "build-static: 3/3 release build with the profile ($profile)"
    RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$profile" \
        cargo build --release --locked --target "$TARGET"
fi

echo "build-static: checking $BIN"
desc="$(file -L "$BIN")"
echo "  $desc"
case "$desc" in
    *"statically linked"* | *"static-pie linked"*) ;;
    *)
        echo "build-static: $BIN is not statically linked" >&2
        exit 1
        ;;
esac
# glibc's ldd says "not a dynamic executable" (exit 1) or "statically linked" for static files.
if ldd_out="$(ldd "$BIN" 2>&1)"; then
    case "$ldd_out" in
        *"statically linked"*) ;;
        *)
            echo "build-static: ldd lists shared libraries:" >&2
            echo "$ldd_out" >&2
            exit 1
            ;;
    esac
fi
version="$("$BIN" --version)"
echo "  $version"
case "$version" in
    gatehouse\ *) ;;
    *)
        echo "build-static: unexpected --version output: $version" >&2
        exit 1
        ;;
esac
echo "build-static: ok ($(du -h "$BIN" | cut -f1))"
