#!/usr/bin/env bash
# Build gatehouse as one static x86_64 musl binary, the container image's binary, without a
# container engine (CI runs this; so can a developer). deploy/build-image.sh then puts it in
# the image archive.
#
#   bash deploy/build-static.sh      # -> target/x86_64-unknown-linux-musl/release/gatehouse
#
# Installs what is missing: the rustup target, and musl-gcc (Debian's musl-tools), which
# mimalloc's C code needs. Then checks that the result is statically linked and runs.
set -euo pipefail
cd "$(dirname "$0")/.."

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
cargo build --release --locked --target "$TARGET"

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
